//! Operations (SPEC §9, §11, §12-13): the billing gate against a real HTTP stand-in for mana-credits,
//! /metrics after real traffic, resource limits exceeded one by one, the healthcheck command and the logs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A stand-in for mana-credits: answers `/api/v1/internal/sync/status/{user}` from a table, counts requests
/// per user, and can be told to fail or to hang.
#[derive(Clone)]
struct Credits {
    url: String,
    inactive: Arc<parking_lot::Mutex<Vec<String>>>,
    hits: Arc<parking_lot::Mutex<HashMap<String, usize>>>,
    mode: Arc<AtomicUsize>, // 0 answer, 1 HTTP 500, 2 hang
    service_keys: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Credits {
    async fn start() -> Credits {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let credits = Credits {
            url: format!("http://{}", listener.local_addr().unwrap()),
            inactive: Default::default(),
            hits: Default::default(),
            mode: Default::default(),
            service_keys: Default::default(),
        };
        let shared = credits.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let credits = shared.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 8192];
                    let mut read = 0;
                    while !buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer[read..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read += n,
                        }
                    }
                    let head = String::from_utf8_lossy(&buffer[..read]).to_string();
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    if let Some(key) = head.lines().find_map(|l| {
                        l.strip_prefix("x-service-key: ")
                            .or_else(|| l.strip_prefix("X-Service-Key: "))
                    }) {
                        credits.service_keys.lock().push(key.trim().to_owned());
                    }
                    let user = path.rsplit('/').next().unwrap_or("").to_owned();
                    *credits.hits.lock().entry(user.clone()).or_default() += 1;
                    let (status, body) = match credits.mode.load(Ordering::SeqCst) {
                        1 => ("500 Internal Server Error", "{}".to_owned()),
                        2 => {
                            // Hangs: never answers within any test's timeout.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        _ => {
                            let active = !credits.inactive.lock().contains(&user);
                            ("200 OK", json!({"active": active, "plan": "x"}).to_string())
                        }
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        credits
    }

    fn hits(&self, user: &str) -> usize {
        self.hits.lock().get(user).copied().unwrap_or(0)
    }
}

async fn billed_server(credits: &Credits, ttl: Duration) -> TestServer {
    let url = credits.url.clone();
    TestServer::start_with(move |c| {
        c.mana_credits_url = Some(url);
        c.mana_service_key = Some("service-secret".into());
        c.billing_cache_ttl = ttl;
        c.billing_timeout = Duration::from_millis(300);
        c.billing_cache_max_users = 500;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_billing_gate_allows_active_refuses_inactive_and_fails_open() {
    let credits = Credits::start().await;
    let server = billed_server(&credits, Duration::from_secs(300)).await;
    let active = unique_user("paying");
    let inactive = unique_user("lapsed");
    credits.inactive.lock().push(inactive.clone());

    server
        .pull(&active, "todo", None, "tasks", LOG_START, None)
        .await
        .assert_status(200);
    assert_eq!(
        credits.service_keys.lock().first().map(String::as_str),
        Some("service-secret")
    );
    for reply in [
        server
            .pull(&inactive, "todo", None, "tasks", LOG_START, None)
            .await,
        server
            .push(
                &inactive,
                "todo",
                None,
                &changeset(vec![insert("tasks", "t", json!({}))]),
            )
            .await,
        server
            .request(
                "GET",
                "/sync/todo/stream",
                &[("authorization", &format!("Bearer {}", token(&inactive)))],
                None,
            )
            .await,
        server
            .request(
                "GET",
                "/sync/stream",
                &[("authorization", &format!("Bearer {}", token(&inactive)))],
                None,
            )
            .await,
    ] {
        reply.assert_error(402, "sync_inactive");
    }
    assert_eq!(
        count_rows(&inactive).await,
        0,
        "nothing written for an inactive user"
    );
    assert_eq!(
        credits.hits(&inactive),
        1,
        "later requests were answered from the cache"
    );

    // Outage: allowed, and counted.
    credits.mode.store(1, Ordering::SeqCst);
    let during_outage = unique_user("outage");
    server
        .pull(&during_outage, "todo", None, "tasks", LOG_START, None)
        .await
        .assert_status(200);
    // Hanging: still answered (the outbound call gives up after the 300 ms timeout).
    credits.mode.store(2, Ordering::SeqCst);
    let hanging = unique_user("hanging");
    server
        .pull(&hanging, "todo", None, "tasks", LOG_START, None)
        .await
        .assert_status(200);
    let metrics = server.request("GET", "/metrics", &[], None).await.text;
    assert!(
        metrics.contains("mana_sync_billing_checks_total{outcome=\"failed_open\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("mana_sync_billing_checks_total{outcome=\"inactive\"} 1"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_request_the_cache_expires_and_stays_bounded() {
    let credits = Credits::start().await;
    let server = billed_server(&credits, Duration::from_secs(1)).await;
    let billing = server.shared.billing.as_ref().expect("gate on");

    // 1,000 concurrent checks of one cold user: one outbound request.
    let cold = unique_user("cold");
    let checks = (0..1000).map(|_| billing.check(&cold));
    let verdicts = futures_util::future::join_all(checks).await;
    assert!(verdicts
        .iter()
        .all(|v| *v == mana_sync::billing::Verdict::Active));
    assert_eq!(credits.hits(&cold), 1);
    // The same through HTTP: 50 concurrent pulls of another cold user.
    let other = unique_user("cold-http");
    let pulls = (0..50).map(|_| server.pull(&other, "todo", None, "tasks", LOG_START, None));
    for reply in futures_util::future::join_all(pulls).await {
        reply.assert_status(200);
    }
    assert_eq!(credits.hits(&other), 1);

    // The cache expires (TTL 1 s here).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    billing.check(&cold).await;
    assert_eq!(credits.hits(&cold), 2);

    // Bounded: 2,000 distinct users with room for 500.
    for i in 0..2000 {
        billing.check(&format!("{cold}-{i}")).await;
        assert!(billing.cached_users() <= 500);
    }
    server.stop().await;
}

/// A strict check of the Prometheus text format: HELP and TYPE for every family, sample lines of the form
/// `name{labels} value`, histogram buckets cumulative and ending in +Inf equal to _count.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                helped.contains(name),
                "TYPE before HELP or without HELP: {line}"
            );
            typed.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        assert!(
            !line.is_empty() && !line.starts_with('#'),
            "unexpected line {line:?}"
        );
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
            let labels = &series[name.len() + 1..series.len() - 1];
            for label in labels.split(',') {
                let (key, quoted) = label.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(
                    !key.is_empty() && quoted.starts_with('"') && quoted.ends_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "sample without TYPE: {line}");
        if name.ends_with("_bucket") {
            let key = series[..series.find("le=").unwrap()].to_owned();
            if let Some((previous_key, previous)) = &last_bucket {
                if *previous_key == key {
                    assert!(value >= *previous, "buckets must be cumulative: {line}");
                }
            }
            last_bucket = Some((key, value));
        }
        samples.insert(series.to_owned(), value);
    }
    // +Inf equals _count for every histogram series.
    for (series, value) in &samples {
        if let Some(prefix) = series.strip_suffix("le=\"+Inf\"}") {
            let count_series = format!("{}_count{}", &prefix[..prefix.find("_bucket").unwrap()], {
                let labels = &prefix[prefix.find('{').unwrap()..];
                let labels = labels.trim_end_matches(',');
                if labels == "{" {
                    String::new()
                } else {
                    format!("{labels}}}")
                }
            });
            assert_eq!(
                samples.get(&count_series),
                Some(value),
                "{series} vs {count_series}"
            );
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_prometheus_text_format_after_real_traffic() {
    let server = TestServer::start().await;
    let user = unique_user("metrics");
    let mut socket = server.authed_socket("/ws", &user, Some("watcher")).await;
    let changes: Vec<Value> = (0..20)
        .map(|i| insert("tasks", &format!("t{i}"), json!({"n": i})))
        .collect();
    server
        .push(&user, "todo", Some("pusher"), &changeset(changes))
        .await
        .assert_status(200);
    assert!(matches!(
        next_frame(&mut socket, Duration::from_secs(10)).await,
        Received::Json(_)
    ));
    server
        .pull(&user, "todo", Some("reader"), "tasks", LOG_START, None)
        .await
        .assert_status(200);
    server
        .request("GET", "/nope", &[], None)
        .await
        .assert_error(404, "not_found");
    // A request is counted once its response is done: wait for the last one.
    wait_until("the 404 is counted", Duration::from_secs(10), || async {
        let reply = server.request("GET", "/metrics", &[], None).await;
        parse_prometheus(&reply.text)
            .get("mana_sync_http_requests_total{route=\"other\",status=\"404\"}")
            .is_some_and(|count| *count >= 1.0)
    })
    .await;

    let reply = server.request("GET", "/metrics", &[], None).await;
    reply.assert_status(200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let samples = parse_prometheus(&reply.text);
    assert!(samples["mana_sync_http_requests_total{route=\"push\",status=\"200\"}"] >= 1.0);
    assert!(samples["mana_sync_http_requests_total{route=\"other\",status=\"404\"}"] >= 1.0);
    assert!(samples["mana_sync_changes_pushed_total"] >= 20.0);
    assert!(samples["mana_sync_changes_pulled_total"] >= 20.0);
    assert_eq!(
        samples["mana_sync_realtime_connections{kind=\"websocket\"}"],
        1.0
    );
    assert_eq!(samples["mana_sync_realtime_users{kind=\"all\"}"], 1.0);
    assert!(samples["mana_sync_notify_delivery_seconds_count"] >= 1.0);
    assert!(samples["mana_sync_push_batch_size_bucket{le=\"20\"}"] >= 1.0);
    assert!(samples.contains_key("mana_sync_db_pool_connections{state=\"in_use\"}"));
    assert!(samples.contains_key("mana_sync_jwks_refreshes_total{outcome=\"ok\"}"));
    assert!(samples.contains_key("mana_sync_log_rows_pruned_total"));
    assert!(samples.contains_key("mana_sync_billing_checks_total{outcome=\"disabled\"}"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_concurrency_limit_answers_503_and_health_stays_up() {
    let server = TestServer::start_with(|c| c.max_concurrent_requests = 1).await;
    let user = unique_user("busy");
    // Hold one request in flight: a push waiting for the user's lock, which a transaction here holds.
    let db = app_role().await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute(&format!("SELECT set_config('app.current_user_id', $1, true), pg_advisory_xact_lock({USER_LOCK_CLASS}, hashtext($1))"), &[&user]).await.unwrap();
    let held = {
        let url = server.url("/sync/todo");
        let auth = format!("Bearer {}", token(&user));
        let body = changeset(vec![insert("tasks", "t", json!({}))])
            .to_string()
            .into_bytes();
        tokio::spawn(
            async move { request("POST", &url, &[("authorization", &auth)], Some(body)).await },
        )
    };
    wait_until(
        "the push holds the only permit",
        Duration::from_secs(10),
        || async { server.shared.request_permits.available_permits() == 0 },
    )
    .await;
    let refused = server
        .pull(
            &unique_user("other"),
            "todo",
            None,
            "tasks",
            LOG_START,
            None,
        )
        .await;
    refused.assert_error(503, "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // Health is exempt.
    server
        .request("GET", "/health", &[], None)
        .await
        .assert_status(200);
    db.batch_execute("COMMIT").await.unwrap();
    held.await.unwrap().assert_status(200);
    server
        .pull(&user, "todo", None, "tasks", LOG_START, None)
        .await
        .assert_status(200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_connections_wait_and_idle_keep_alive_connections_are_closed() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 1;
        c.idle_timeout = Duration::from_millis(500);
    })
    .await;
    // The first connection is served and kept alive…
    let mut first = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    first
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4096];
    let n = first.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
    // …so a second one waits (it is not refused and nothing crashes)…
    let second = tokio::spawn({
        let url = server.url("/health");
        async move { request("GET", &url, &[], None).await }
    });
    // Not served for a while: a non-event, only time can show it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second connection waits for a free slot"
    );
    // …until the idle first connection is closed by the server, which frees the slot.
    let closed = tokio::time::timeout(Duration::from_secs(10), first.read(&mut buffer))
        .await
        .expect("closed by the server");
    assert_eq!(
        closed.unwrap(),
        0,
        "the server closed the idle keep-alive connection"
    );
    second.await.unwrap().assert_status(200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_command_reports_the_servers_health() {
    let server = TestServer::start().await;
    let binary = env!("CARGO_BIN_EXE_mana-sync");
    let ok = std::process::Command::new(binary)
        .args(["healthcheck", "--url", &server.url("/health")])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let address = server.addr;
    server.stop().await;
    let down = std::process::Command::new(binary)
        .args(["healthcheck", "--url", &format!("http://{address}/health")])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("health"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_request_ids_and_never_tokens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("DATABASE_URL", &cluster().conn_string)
        .env("JWKS_URL", "")
        .env("JWKS_FILE", &keys().jwks_path)
        .env("LOG_LEVEL", "debug")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_until("server came up", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let user = unique_user("logs");
    let token = token(&user);
    let body = changeset(vec![insert(
        "tasks",
        "secret-record",
        json!({"title": "very secret title"}),
    )])
    .to_string();
    let reply = request(
        "POST",
        &format!("{base}/sync/todo"),
        &[("authorization", &format!("Bearer {token}"))],
        Some(body.into_bytes()),
    )
    .await;
    reply.assert_status(200);
    let request_id = reply
        .header("x-request-id")
        .expect("x-request-id")
        .to_owned();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(!stdout.is_empty());
    for line in stdout.lines() {
        let value: Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(
            value["ts"].is_string() && value["level"].is_string() && value["msg"].is_string(),
            "{line}"
        );
    }
    assert!(
        stdout.contains(&request_id),
        "the request is logged with its id"
    );
    assert!(
        !stdout.contains(&token) && !stdout.contains(token.split('.').nth(2).unwrap()),
        "no token in logs"
    );
    assert!(
        !stdout.contains("very secret title"),
        "no record contents in logs"
    );
}
