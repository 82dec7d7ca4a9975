//! Test support: a real server on port 0 against the real PostgreSQL test cluster, a real HTTP client,
//! signing keys, and direct database access for checking what was (not) written.
//!
//! One PostgreSQL cluster serves the whole test binary (`devdb::test_cluster`); tests keep apart by using
//! their own user ids (`unique_user`) or, where they need a pristine schema, their own database.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use mana_sync::auth::devkeys;
use mana_sync::config::Config;
use mana_sync::devdb;
use mana_sync::server::ServerHandle;
use mana_sync::startup;
use mana_sync::state::Shared;
pub use mana_sync::test_support::{percent_encode, Rng, USER_LOCK_CLASS};
use serde_json::{json, Value};

/// The cursor of a device that has never synced: it gets a snapshot of the merged state (SPEC §6).
pub const EPOCH: &str = "1970-01-01T00:00:00.000Z";
/// A log cursor before any row this suite writes: reads from it page through the log itself, which is
/// what tests of the log's wire shape want.
pub const LOG_START: &str = "2000-01-01T00:00:00.000Z";

/// The signing key every test server trusts (through a JWKS file).
pub struct TestKeys {
    pub kid: String,
    pub key: SigningKey,
    pub dir: PathBuf,
    pub jwks_path: PathBuf,
}

pub fn keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mana-sync-test-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (key_path, jwks_path) = devkeys::write_dev_keys(&dir).expect("writing test keys");
        let (kid, key) = devkeys::load_signing_key(&key_path).expect("reading test key");
        TestKeys {
            kid,
            key,
            dir,
            jwks_path,
        }
    })
}

/// A token for `user` from the trusted key, valid for 15 minutes, with the default audience.
pub fn token(user: &str) -> String {
    let keys = keys();
    devkeys::mint_token(
        &keys.kid,
        &keys.key,
        user,
        Duration::from_secs(900),
        None,
        Some("mana"),
        mana_sync::clock::unix_now(),
    )
}

/// A user id no other test uses.
pub fn unique_user(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn cluster() -> &'static devdb::TestCluster {
    devdb::test_cluster()
}

/// The configuration of a test server: the shared cluster, the test key, port 0.
pub fn test_config() -> Config {
    mana_sync::log::set_level(mana_sync::log::Level::Warn);
    let mut config = Config::defaults();
    config.database_url = Some(cluster().conn_string.clone());
    config.jwks_url = None;
    config.jwks_file = Some(keys().jwks_path.clone());
    config.port = 0;
    config.bind_address = "127.0.0.1".parse().unwrap();
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    handle: Option<ServerHandle>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config();
        adjust(&mut config);
        let database = config
            .database_url
            .clone()
            .expect("tests name their database");
        let shared = startup::build(config, database.parse().expect("valid connection string"))
            .await
            .expect("server starts");
        let handle = ServerHandle::start(shared.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind");
        TestServer {
            addr: handle.addr,
            shared,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop().await;
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        request(method, &self.url(path), headers, body).await
    }

    /// `POST /sync/{app}` as `user` from `device` (sent as X-Client-Id when given).
    pub async fn push(&self, user: &str, app: &str, device: Option<&str>, body: &Value) -> Reply {
        let token = token(user);
        let auth = format!("Bearer {token}");
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(device) = device {
            headers.push(("x-client-id", device));
        }
        self.request(
            "POST",
            &format!("/sync/{app}"),
            &headers,
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// `GET /sync/{app}/pull` as `user` from `device`.
    pub async fn pull(
        &self,
        user: &str,
        app: &str,
        device: Option<&str>,
        collection: &str,
        since: &str,
        limit: Option<usize>,
    ) -> Reply {
        let token = token(user);
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(device) = device {
            headers.push(("x-client-id", device));
        }
        let mut path = format!(
            "/sync/{app}/pull?collection={collection}&since={}",
            percent_encode(since)
        );
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        self.request("GET", &path, &headers, None).await
    }

    /// Pulls page after page from `since` until `hasMore` is false; returns every change and the last cursor.
    pub async fn pull_all(
        &self,
        user: &str,
        app: &str,
        device: Option<&str>,
        collection: &str,
        since: &str,
        limit: Option<usize>,
    ) -> (Vec<Value>, String) {
        let mut cursor = since.to_owned();
        let mut changes = Vec::new();
        for _ in 0..10_000 {
            let reply = self
                .pull(user, app, device, collection, &cursor, limit)
                .await;
            assert_eq!(reply.status, 200, "{}", reply.text);
            changes.extend(
                reply.body["serverChanges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .cloned(),
            );
            cursor = reply.body["syncedUntil"].as_str().unwrap().to_owned();
            if reply.body["hasMore"] != json!(true) {
                return (changes, cursor);
            }
        }
        panic!("pull_all did not finish");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that panicked before `stop`: the runtime ending aborts the server task.
        let _ = self.handle.take();
    }
}

/// An HTTP response as the tests look at it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status, printing the body when it is another (which usually says why).
    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.text);
    }

    /// Asserts a JSON error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.body["error"], json!(code), "{}", self.text);
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
    }

    pub fn changes(&self) -> &Vec<Value> {
        self.body["serverChanges"]
            .as_array()
            .expect("serverChanges")
    }
}

/// A real HTTP/1.1 request with ureq, off the async threads. Panics on a transport failure.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Reply {
    try_request(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// The same, with a transport failure (refused, reset, unreadable body) as an error instead of a panic.
pub async fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Reply, String> {
    let method = method.to_owned();
    let url = url.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .allow_non_standard_methods(true)
                .timeout_global(Some(Duration::from_secs(60)))
                .build(),
        );
        let mut builder = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        for (name, value) in &headers {
            builder = builder.header(name, value);
        }
        let result = match body {
            Some(body) => agent.run(builder.body(body).unwrap()),
            None => agent.run(builder.body(()).unwrap()),
        };
        let mut response = result.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(|e| format!("reading the body: {e}"))?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            text,
            body,
        })
    })
    .await
    .unwrap()
}

/// A superuser connection to the shared test database (bypasses row-level security: for inspection).
pub async fn superuser() -> tokio_postgres::Client {
    connect(
        &cluster()
            .conn_string
            .replace("user=mana_sync", "user=postgres"),
    )
    .await
}

/// A connection as the ordinary role the server uses (bound by row-level security).
pub async fn app_role() -> tokio_postgres::Client {
    connect(&cluster().conn_string).await
}

/// How many transactions wait for `user`'s advisory lock (asked for, not granted), as `observer` (a
/// superuser) sees it: the way to know that a push is blocked, instead of sleeping and hoping it is.
pub async fn lock_waiters(observer: &tokio_postgres::Client, user: &str) -> i64 {
    observer
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND classid::bigint = {USER_LOCK_CLASS} \
                 AND objid::bigint = (hashtext($1)::bigint & 4294967295)"
            ),
            &[&user],
        )
        .await
        .unwrap()
        .get(0)
}

/// A connection (no TLS) whose connection task runs until the client is dropped.
pub async fn connect(conn_string: &str) -> tokio_postgres::Client {
    devdb::connect(conn_string).await.expect("connect")
}

/// Rows of `user` in `sync_changes`, counted past row-level security.
pub async fn count_rows(user: &str) -> i64 {
    superuser()
        .await
        .query_one(
            "SELECT count(*) FROM sync_changes WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until `condition` holds, checking every 20 ms; panics naming `what` after `within`. For a test
/// that waits for something it can observe, instead of sleeping and hoping it has happened. A plain
/// condition is written `|| async { … }`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `server`'s notification listener is up (its `LISTEN` in effect): only then does the store's
/// memory hand out tickets, and only then does a commit's hint reach this instance's sockets.
pub async fn wait_for_listener(server: &TestServer) {
    wait_until("the listener is up", Duration::from_secs(30), || async {
        server
            .shared
            .store
            .known()
            .ticket("listener-probe")
            .is_some()
    })
    .await;
}

/// An insert change of `table`/`id` with `data`.
pub fn insert(table: &str, id: &str, data: Value) -> Value {
    json!({"table": table, "id": id, "op": "insert", "data": data})
}

/// An update change setting `field` to `value` at `at`.
pub fn update(table: &str, id: &str, field: &str, value: Value, at: &str) -> Value {
    json!({"table": table, "id": id, "op": "update", "fields": {field: {"value": value, "at": at}}})
}

pub fn changeset(changes: Vec<Value>) -> Value {
    json!({"since": LOG_START, "changes": changes})
}

/// Sends `head` (request line and headers, without the blank line) and then `body` on a plain TCP
/// connection, writing the body from another thread and ignoring write errors: the server may answer
/// (413) and close before the body is through, and the answer is what the test wants to read.
pub async fn raw_request(addr: SocketAddr, head: String, body: Vec<u8>) -> Reply {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(format!("{head}\r\n\r\n").as_bytes())
            .expect("write head");
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for chunk in body.chunks(64 * 1024) {
                if writer.write_all(chunk).is_err() {
                    break;
                }
            }
        });
        let mut response = Vec::new();
        let mut buffer = [0u8; 64 * 1024];
        // Read until the headers and the announced body are in (or the server closes).
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buffer[..n]),
            }
            if let Some(end) = find(&response, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|l| l.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if response.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = sender.join();
        let end = find(&response, b"\r\n\r\n").expect("a complete response head");
        let head = String::from_utf8_lossy(&response[..end]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let text = String::from_utf8_lossy(&response[end + 4..]).into_owned();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            body,
        }
    })
    .await
    .unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A WebSocket client connection.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the next frame from the server was.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Json(Value),
    Closed {
        code: u16,
        reason: String,
    },
    /// The connection ended without a close frame.
    Ended,
    Nothing,
}

impl TestServer {
    pub async fn socket(&self, path: &str) -> Socket {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{}{}", self.addr, path))
            .await
            .expect("ws connect");
        socket
    }

    /// Opens `path`, authenticates as `user` (with `client_id`) and expects `auth-ok`.
    pub async fn authed_socket(&self, path: &str, user: &str, client_id: Option<&str>) -> Socket {
        let mut socket = self.socket(path).await;
        send_json(
            &mut socket,
            &json!({"type": "auth", "token": token(user), "clientId": client_id}),
        )
        .await;
        assert_eq!(
            next_frame(&mut socket, Duration::from_secs(10)).await,
            Received::Json(json!({"type": "auth-ok"}))
        );
        socket
    }
}

pub async fn send_json(socket: &mut Socket, value: &Value) {
    use futures_util::SinkExt;
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            value.to_string(),
        ))
        .await
        .expect("ws send");
}

/// The next text or close frame within `wait` (pings and pongs are skipped).
pub async fn next_frame(socket: &mut Socket, wait: Duration) -> Received {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Received::Nothing,
            Ok(None) | Ok(Some(Err(_))) => return Received::Ended,
            Ok(Some(Ok(Message::Text(text)))) => {
                return Received::Json(
                    serde_json::from_str(text.as_str()).expect("server sends JSON"),
                )
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Received::Closed { code, reason };
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// An open SSE response, read line by line on a thread of its own.
pub struct SseClient {
    pub status: u16,
    pub events: tokio::sync::mpsc::UnboundedReceiver<SseEvent>,
    /// Raw text as received, to check the exact line format.
    pub raw: Arc<std::sync::Mutex<String>>,
}

impl SseClient {
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> SseClient {
        let url = url.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let (status_tx, status_rx) = tokio::sync::oneshot::channel();
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let raw = Arc::new(std::sync::Mutex::new(String::new()));
        let raw_writer = raw.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let agent = ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build(),
            );
            let mut builder = ureq::http::Request::builder().method("GET").uri(&url);
            for (name, value) in &headers {
                builder = builder.header(name, value);
            }
            let mut response = match agent.run(builder.body(()).unwrap()) {
                Ok(response) => response,
                Err(_) => return,
            };
            let status = response.status().as_u16();
            if status != 200 {
                // Not a stream: the (short) error body goes to `raw` before the status is handed over, so a
                // failed assert on the status can show it.
                let body = response.body_mut().read_to_string().unwrap_or_default();
                raw_writer.lock().unwrap().push_str(&body);
                let _ = status_tx.send(status);
                return;
            }
            let _ = status_tx.send(status);
            let reader =
                std::io::BufReader::new(response.body_mut().with_config().limit(u64::MAX).reader());
            let (mut event, mut id, mut data) = (String::new(), None, String::new());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                raw_writer.lock().unwrap().push_str(&format!("{line}\n"));
                if line.is_empty() {
                    if !event.is_empty() || !data.is_empty() {
                        let parsed = SseEvent {
                            event: std::mem::take(&mut event),
                            id: id.take(),
                            data: serde_json::from_str(&std::mem::take(&mut data))
                                .unwrap_or(Value::Null),
                        };
                        if events_tx.send(parsed).is_err() {
                            return;
                        }
                    }
                } else if let Some(value) = line.strip_prefix("event: ") {
                    event = value.to_owned();
                } else if let Some(value) = line.strip_prefix("id: ") {
                    id = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
        });
        let status = status_rx.await.unwrap_or(0);
        SseClient {
            status,
            events,
            raw,
        }
    }

    /// What was received so far: for a status other than 200, the whole error body.
    pub fn text(&self) -> String {
        self.raw.lock().unwrap().clone()
    }

    /// The next event other than a heartbeat, within `wait`.
    pub async fn next_change(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if event.event == "heartbeat" => continue,
                Ok(event) => return event,
                Err(_) => return None,
            }
        }
    }
}

/// A fresh database holding `sync_changes` as today's (Go) server creates it (`field_timestamps`, no
/// `field_meta`, no clock, no row-level security), with `rows` (SQL) run after it; its connection string.
pub async fn go_database(rows: &str) -> String {
    let database = cluster().fresh_database();
    connect(&database)
        .await
        .batch_execute(&format!(
            "CREATE TABLE sync_changes (
                id UUID PRIMARY KEY DEFAULT gen_random_uuid(), app_id TEXT NOT NULL, table_name TEXT NOT NULL,
                record_id TEXT NOT NULL, user_id TEXT NOT NULL,
                op TEXT NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
                data JSONB, field_timestamps JSONB DEFAULT '{{}}', client_id TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now());
             {rows}"
        ))
        .await
        .expect("the Go server's table");
    database
}

/// An insert of `tasks`/`id` as the parser would have produced it, for driving the store directly.
pub fn parsed_insert(id: &str, data: Value) -> mana_sync::protocol::NewChange {
    mana_sync::protocol::NewChange {
        table: "tasks".into(),
        record_id: id.into(),
        op: mana_sync::protocol::Op::Insert,
        data: data.as_object().expect("an object").clone(),
        field_meta: Default::default(),
        space_id: None,
        actor: None,
        origin: None,
        schema_version: 1,
    }
}
