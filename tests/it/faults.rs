//! Faults (SPEC §3, §8, §11, §12): PostgreSQL going away under load, the server process killed with
//! SIGKILL in the middle of pushes, the JWKS endpoint answering garbage, lying or hanging after the first
//! fetch, and slow clients (slowloris) holding connections.
//!
//! Each database fault runs on a private cluster (`EmbeddedPostgres` in a short directory under /tmp,
//! non-durable) so it can be stopped and started without disturbing the shared test cluster.
//!
//! Not here, on purpose:
//! - the JWKS endpoint *down* (500, connection refused) is `auth::jwks_endpoint_down_keeps_cached_keys`;
//! - the billing endpoint hanging: this build has no billing gate (no `billing` module in src/; app.rs
//!   only logs that `MANA_CREDITS_URL` is not checked), so there is nothing to test yet;
//! - slow WebSocket consumers are `realtime::a_slow_consumer_is_closed_while_other_users_keep_receiving`;
//! - the database down with no load is `http_errors::database_down_is_503_and_the_server_recovers`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mana_sync::auth::devkeys;
use mana_sync::clock::unix_now;
use mana_sync::devdb::{EmbeddedOptions, EmbeddedPostgres};
use serde_json::{json, Value};

use crate::support::{
    self, changeset, insert, keys, token, unique_user, wait_until, TestServer, LOG_START,
};

const BIN: &str = env!("CARGO_BIN_EXE_mana-sync");
const BATCH: usize = 5;

/// A short, fresh directory for a private cluster (the socket path must stay short).
fn short_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = PathBuf::from(format!(
        "/tmp/msf-{}-{tag}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn private_options(dir: &PathBuf) -> EmbeddedOptions {
    EmbeddedOptions {
        durable: false,
        ..EmbeddedOptions::from_process_env(dir)
    }
}

/// What one HTTP attempt gave: a response, or a transport failure (connection refused/reset).
#[derive(Debug, Clone)]
enum Outcome {
    Answered {
        status: u16,
        retry_after: Option<String>,
        text: String,
    },
    Transport(String),
}

/// One HTTP request that never panics: transport failures are an outcome like any other.
async fn try_request(
    method: &str,
    url: &str,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
) -> Outcome {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    match support::try_request(method, url, &headers, body).await {
        Ok(reply) => Outcome::Answered {
            status: reply.status,
            retry_after: reply.header("retry-after").map(str::to_owned),
            text: reply.text,
        },
        Err(e) => Outcome::Transport(e),
    }
}

/// A batch of `BATCH` inserts whose ids all start with `prefix-`.
fn batch(prefix: &str) -> Vec<u8> {
    changeset(
        (0..BATCH)
            .map(|k| insert("tasks", &format!("{prefix}-{k}"), json!({"k": k})))
            .collect(),
    )
    .to_string()
    .into_bytes()
}

/// Every push attempt of the load generators: (batch prefix, when it was answered, outcome).
type Journal = Arc<Mutex<Vec<(String, Instant, Outcome)>>>;

/// Starts `writers` tasks that push batches to `base/sync/todo` as `user` until `stop` is set.
fn start_load(
    base: String,
    user: &str,
    writers: usize,
    stop: Arc<AtomicBool>,
    journal: Journal,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let base = base.clone();
            let auth = format!("Bearer {}", token(user));
            let stop = stop.clone();
            let journal = journal.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let prefix = format!("w{w}x{n}");
                    let outcome = try_request(
                        "POST",
                        &format!("{base}/sync/todo"),
                        vec![
                            ("authorization".into(), auth.clone()),
                            ("content-type".into(), "application/json".into()),
                            ("x-client-id".into(), format!("writer-{w}")),
                        ],
                        Some(batch(&prefix)),
                    )
                    .await;
                    let refused = matches!(outcome, Outcome::Transport(_));
                    journal
                        .lock()
                        .unwrap()
                        .push((prefix, Instant::now(), outcome));
                    // Do not spin on a port nobody listens on.
                    let pause = if refused { 50 } else { 10 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            })
        })
        .collect()
}

/// Rows per batch prefix of `user`, read past row-level security.
async fn rows_per_batch(superuser: &str, user: &str) -> BTreeMap<String, i64> {
    let client = support::connect(superuser).await;
    client
        .query(
            "SELECT split_part(record_id, '-', 1), count(*) FROM sync_changes \
             WHERE user_id = $1 GROUP BY 1",
            &[&user],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect()
}

/// Every acknowledged batch is there completely; no batch is there in part.
fn assert_all_or_nothing(journal: &[(String, Instant, Outcome)], rows: &BTreeMap<String, i64>) {
    let acknowledged: BTreeSet<&str> = journal
        .iter()
        .filter(|(_, _, o)| matches!(o, Outcome::Answered { status: 200, .. }))
        .map(|(prefix, _, _)| prefix.as_str())
        .collect();
    assert!(!acknowledged.is_empty());
    for prefix in &acknowledged {
        assert_eq!(
            rows.get(*prefix).copied(),
            Some(BATCH as i64),
            "acknowledged batch {prefix} is not fully stored"
        );
    }
    for (prefix, count) in rows {
        assert_eq!(*count, BATCH as i64, "batch {prefix} is half-written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_and_restarted_under_load_loses_no_acknowledged_batch() {
    let dir = short_dir("pg");
    let options = private_options(&dir);
    let embedded = EmbeddedPostgres::start(options.clone())
        .await
        .expect("private cluster starts");
    let url = embedded.connection_string();
    let superuser = embedded.superuser_connection_string("mana_sync");
    let server = TestServer::start_with(move |config| {
        config.database_url = Some(url);
        config.db_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let user = unique_user("fault-pg");
    let stop = Arc::new(AtomicBool::new(false));
    let journal: Journal = Arc::default();
    let writers = 4;
    let started = Instant::now();
    let tasks = start_load(
        server.url(""),
        &user,
        writers,
        stop.clone(),
        journal.clone(),
    );

    wait_until(
        "every writer is served",
        Duration::from_secs(30),
        || async { every_writer_served(&journal, writers, started) },
    )
    .await;
    let outage = Instant::now();
    embedded.stop().await.expect("cluster stops");
    // The outage lasts: pushes meanwhile must be answered 503, never fail or hang.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let embedded = EmbeddedPostgres::start(options)
        .await
        .expect("cluster restarts on the same directory");
    let restarted = Instant::now();

    // The service recovers by itself: every writer gets a 200 again.
    wait_until(
        "pushes succeed again after the restart",
        Duration::from_secs(30),
        || async { every_writer_served(&journal, writers, restarted) },
    )
    .await;
    let recovered = restarted.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let journal = journal.lock().unwrap().clone();

    let mut unavailable = 0;
    for (prefix, at, outcome) in &journal {
        match outcome {
            Outcome::Answered { status: 200, .. } => {}
            Outcome::Answered {
                status: 503,
                retry_after,
                text,
            } => {
                unavailable += 1;
                assert!(
                    retry_after
                        .as_deref()
                        .and_then(|s| s.parse::<u32>().ok())
                        .is_some_and(|s| s >= 1),
                    "{prefix}: 503 without Retry-After: {text}"
                );
                let body: Value = serde_json::from_str(text).expect("JSON error");
                assert!(
                    body["error"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("database_")),
                    "{prefix}: {text}"
                );
                assert!(*at > outage, "{prefix}: a 503 before the outage: {text}");
            }
            Outcome::Answered { status, text, .. } => {
                panic!("{prefix}: {status} {text}")
            }
            // The server stays up: a connection must never fail.
            Outcome::Transport(e) => panic!("{prefix}: transport failure {e}"),
        }
    }
    assert!(
        unavailable > 0,
        "no request saw the outage ({} attempts)",
        journal.len()
    );

    let rows = rows_per_batch(&superuser, &user).await;
    assert_all_or_nothing(&journal, &rows);
    eprintln!(
        "postgres restart: {} pushes, {unavailable} answered 503, recovered {recovered:?} after the restart",
        journal.len()
    );

    server.stop().await;
    embedded.stop().await.expect("cluster stops");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether each of the first `writers` writers of `start_load` has had a push answered 200 after `since`.
fn every_writer_served(journal: &Journal, writers: usize, since: Instant) -> bool {
    let journal = journal.lock().unwrap();
    (0..writers).all(|w| {
        journal.iter().any(|(prefix, at, o)| {
            prefix.starts_with(&format!("w{w}x"))
                && *at > since
                && matches!(o, Outcome::Answered { status: 200, .. })
        })
    })
}

/// A `mana-sync serve` child process; killed (SIGKILL) if a test fails half-way.
struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    async fn start(database_url: &str, log: &std::path::Path) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = Command::new(BIN);
        command.arg("serve").env_clear().stdin(Stdio::null());
        for name in ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let child = command
            .env("DATABASE_URL", database_url)
            .env("JWKS_FILE", &keys().jwks_path)
            .env("JWKS_URL", "")
            .env("PORT", port.to_string())
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("LOG_LEVEL", "warn")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning mana-sync serve");
        let mut process = ServerProcess { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!(
                    "mana-sync serve exited with {status}:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if let Outcome::Answered { status: 200, .. } =
                try_request("GET", &process.url("/health"), vec![], None).await
            {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "mana-sync serve never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn sigkill(&mut self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "killed: {status}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_in_the_middle_of_pushes_leaves_no_half_batch_and_loses_no_acknowledged_one() {
    let dir = short_dir("kill");
    let embedded = EmbeddedPostgres::start(private_options(&dir))
        .await
        .expect("private cluster starts");
    let url = embedded.connection_string();
    let superuser = embedded.superuser_connection_string("mana_sync");
    let user = unique_user("fault-kill");
    let log = dir.join("server.log");
    let mut process = ServerProcess::start(&url, &log).await;

    let stop = Arc::new(AtomicBool::new(false));
    let journal: Journal = Arc::default();
    let tasks = start_load(process.url(""), &user, 4, stop.clone(), journal.clone());
    // Let the writers get going, then kill the server while requests are in flight.
    wait_until(
        "20 pushes went through",
        Duration::from_secs(30),
        || async {
            let journal = journal.lock().unwrap();
            let served = journal
                .iter()
                .filter(|(_, _, o)| matches!(o, Outcome::Answered { status: 200, .. }));
            served.count() >= 20
        },
    )
    .await;
    process.sigkill();
    wait_until(
        "a request is cut off by the kill",
        Duration::from_secs(10),
        || async {
            let journal = journal.lock().unwrap();
            journal
                .iter()
                .any(|(_, _, o)| matches!(o, Outcome::Transport(_)))
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let journal = journal.lock().unwrap().clone();
    for (prefix, _, outcome) in &journal {
        if let Outcome::Answered { status, text, .. } = outcome {
            assert!(
                *status == 200 || *status == 503,
                "{prefix}: {status} {text}"
            );
        }
    }
    let cut_off = journal
        .iter()
        .filter(|(_, _, o)| matches!(o, Outcome::Transport(_)))
        .count();
    assert!(
        cut_off > 0,
        "some request must have been cut off by the kill"
    );

    // Restart on the same database: it comes up, serves, and the data is consistent.
    let process = ServerProcess::start(&url, &log.with_extension("2.log")).await;
    let rows = rows_per_batch(&superuser, &user).await;
    assert_all_or_nothing(&journal, &rows);
    let after = try_request(
        "POST",
        &process.url("/sync/todo"),
        vec![
            ("authorization".into(), format!("Bearer {}", token(&user))),
            ("content-type".into(), "application/json".into()),
        ],
        Some(batch("after")),
    )
    .await;
    assert!(
        matches!(after, Outcome::Answered { status: 200, .. }),
        "{after:?}"
    );
    eprintln!(
        "sigkill: {} pushes, {} cut off, {} batches stored",
        journal.len(),
        cut_off,
        rows.len()
    );
    drop(process);
    embedded.stop().await.expect("cluster stops");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- JWKS endpoint misbehaving after the first fetch -----------------------------------------------------

/// A JWKS endpoint whose answer can be changed: a body to serve, or `None` to accept and never answer.
struct FakeJwks {
    addr: SocketAddr,
    body: Arc<Mutex<Option<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    /// Requests accepted and left without an answer.
    hanging: Arc<AtomicU32>,
}

impl FakeJwks {
    fn start(body: Vec<u8>) -> FakeJwks {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(Some(body)));
        let stop = Arc::new(AtomicBool::new(false));
        let hanging_count = Arc::new(AtomicU32::new(0));
        let (served, stopped, counted) = (body.clone(), stop.clone(), hanging_count.clone());
        std::thread::spawn(move || {
            let mut hanging = Vec::new();
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let mut buffer = [0u8; 4096];
                let mut request = Vec::new();
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                match served.lock().unwrap().clone() {
                    Some(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(&body);
                    }
                    None => {
                        hanging.push(stream);
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        FakeJwks {
            addr,
            body,
            stop,
            hanging: hanging_count,
        }
    }

    fn serve(&self, body: Option<&[u8]>) {
        *self.body.lock().unwrap() = body.map(<[u8]>::to_vec);
    }
}

impl Drop for FakeJwks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn jwks_of(kid: &str, key: &SigningKey) -> Vec<u8> {
    use base64::Engine as _;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
    json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}]})
        .to_string()
        .into_bytes()
}

fn token_of(kid: &str, key: &SigningKey, user: &str) -> String {
    devkeys::mint_token(
        kid,
        key,
        user,
        Duration::from_secs(900),
        None,
        Some("mana"),
        unix_now(),
    )
}

async fn pull_status(server: &TestServer, token: &str) -> (u16, Value) {
    let reply = server
        .request(
            "GET",
            &format!(
                "/sync/todo/pull?collection=tasks&since={}",
                support::percent_encode(LOG_START)
            ),
            &[("authorization", &format!("Bearer {token}"))],
            None,
        )
        .await;
    (reply.status, reply.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_endpoint_answering_garbage_or_hanging_keeps_the_cached_keys() {
    let key = SigningKey::from_bytes(&[21; 32]);
    let endpoint = FakeJwks::start(jwks_of("k-good", &key));
    let url = format!("http://{}/jwks", endpoint.addr);
    let server = TestServer::start_with(move |config| {
        config.jwks_url = Some(url);
        config.jwks_file = None;
    })
    .await;
    let user = unique_user("fault-jwks");
    let good = token_of("k-good", &key, &user);
    let (status, body) = pull_status(&server, &good).await;
    assert_eq!(status, 200, "{body}");

    let rsa_only =
        json!({"keys": [{"kty": "RSA", "kid": "r1", "n": "AQAB", "e": "AQAB"}]}).to_string();
    let wrong_x = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k-good", "x": "AAAA"}]})
        .to_string();
    let huge = format!(
        "{{\"keys\":[],\"pad\":\"{}\"}}",
        "p".repeat(2 * 1024 * 1024)
    );
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        (
            "HTML",
            b"<html><body>502 Bad Gateway</body></html>".to_vec(),
        ),
        ("empty", Vec::new()),
        ("null", b"null".to_vec()),
        ("no keys", b"{\"keys\":[]}".to_vec()),
        ("keys not an array", b"{\"keys\":\"k-good\"}".to_vec()),
        ("only an RSA key", rsa_only.into_bytes()),
        ("the same kid with a broken x", wrong_x.into_bytes()),
        ("2 MB", huge.into_bytes()),
        ("invalid UTF-8", b"\xff\xfe{".to_vec()),
    ];
    for (name, body) in garbage {
        endpoint.serve(Some(&body));
        assert!(
            server.shared.auth.refresh().await.is_err(),
            "{name}: the refresh must fail"
        );
        assert_eq!(
            server.shared.auth.key_count(),
            1,
            "{name}: the cached key stays"
        );
        let (status, body) = pull_status(&server, &good).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    // An unknown kid while the endpoint answers garbage is the client's problem, not an outage.
    let stranger = SigningKey::from_bytes(&[22; 32]);
    let (status, body) = pull_status(&server, &token_of("k-new", &stranger, &user)).await;
    assert_eq!((status, body["error"].clone()), (401, json!("unknown_key")));

    // Hanging: a refresh waits for the fetch timeout, and meanwhile known keys verify without waiting.
    endpoint.serve(None);
    let auth = server.shared.auth.clone();
    let refresh = tokio::spawn(async move { auth.refresh().await });
    wait_until(
        "the refresh's fetch hangs",
        Duration::from_secs(10),
        || async { endpoint.hanging.load(Ordering::SeqCst) > 0 },
    )
    .await;
    let (status, body) = pull_status(&server, &good).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !refresh.is_finished(),
        "a known key was verified only after the hanging JWKS fetch gave up"
    );
    assert!(
        refresh.await.unwrap().is_err(),
        "the hanging fetch times out"
    );
    let (status, body) = pull_status(&server, &good).await;
    assert_eq!(status, 200, "{body}");

    // A well-formed answer is believed: the JWKS endpoint is the root of trust. If it lies (drops the
    // real key, publishes an attacker's), the cache follows it — documented in SECURITY.md.
    let attacker = SigningKey::from_bytes(&[23; 32]);
    endpoint.serve(Some(&jwks_of("k-evil", &attacker)));
    assert_eq!(server.shared.auth.refresh().await, Ok(1));
    let (status, body) = pull_status(&server, &good).await;
    assert_eq!((status, body["error"].clone()), (401, json!("unknown_key")));
    assert_eq!(
        pull_status(&server, &token_of("k-evil", &attacker, &user))
            .await
            .0,
        200
    );
    server.stop().await;
}

// ---- slow clients --------------------------------------------------------------------------------------

/// Writes `head` one byte per `every` on a fresh connection until the server closes it; returns how long
/// that took and what the server sent (if anything).
fn trickle(
    addr: SocketAddr,
    head: &'static [u8],
    every: Duration,
    give_up: Duration,
) -> (Duration, Vec<u8>, bool) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(every)).unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    for byte in head.iter().cycle() {
        if started.elapsed() > give_up {
            return (started.elapsed(), received, false);
        }
        if stream.write_all(&[*byte]).is_err() {
            return (started.elapsed(), received, true);
        }
        // Waiting for the next byte doubles as watching for the close.
        match stream.read(&mut buffer) {
            Ok(0) => return (started.elapsed(), received, true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (started.elapsed(), received, true),
        }
    }
    unreachable!()
}

/// Opens a connection, then only watches it: when (if) does the server close it?
fn watch_idle(stream: &mut TcpStream, give_up: Duration) -> Option<Duration> {
    stream.set_read_timeout(Some(give_up)).unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_at_the_header_read_timeout_while_others_are_served() {
    let server = TestServer::start_with(|config| {
        config.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.addr;
    const HEAD: &[u8] =
        b"GET /health HTTP/1.1\r\nHost: t\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";

    // Twenty slow clients at once, one byte per second each.
    let slow: Vec<_> = (0..20)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                trickle(addr, HEAD, Duration::from_secs(1), Duration::from_secs(15))
            })
        })
        .collect();
    // Meanwhile ordinary requests are answered promptly.
    for _ in 0..10 {
        let reply = server.request("GET", "/health", &[], None).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        // Spread over the first second of the slow connections' trickle.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for handle in slow {
        let (elapsed, received, closed) = handle.await.unwrap();
        assert!(
            closed,
            "a slowloris connection was still open after {elapsed:?}"
        );
        // Whatever hyper answers (a bare 408 or nothing), it is never a 200.
        let text = String::from_utf8_lossy(&received);
        assert!(!text.contains(" 200 "), "{text}");
    }
    server.stop().await;
}

/// What the server does with connections that say nothing: measured, then asserted.
///
/// - A connection that never sends a byte is closed at the header read timeout too (hyper 1 arms the
///   timer when it starts waiting for a request head, not at the first byte).
/// - A keep-alive connection that went idle after a complete request is closed the same way: the header
///   read timeout is also the idle keep-alive timeout (there is no separate setting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_keep_alive_connections_are_closed_at_the_header_read_timeout() {
    let server = TestServer::start_with(|config| {
        config.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.addr;
    let (silent, idle) = tokio::task::spawn_blocking(move || {
        let mut silent = TcpStream::connect(addr).unwrap();
        let silent = watch_idle(&mut silent, Duration::from_secs(8));

        let mut kept = TcpStream::connect(addr).unwrap();
        kept.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut response = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&response).contains("\"service\"") {
            let n = kept.read(&mut buffer).unwrap();
            assert!(n > 0, "closed before answering");
            response.extend_from_slice(&buffer[..n]);
        }
        assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
        let idle = watch_idle(&mut kept, Duration::from_secs(8));
        (silent, idle)
    })
    .await
    .unwrap();
    silent.expect("a silent connection must be closed");
    idle.expect("an idle keep-alive connection must be closed");
    server.stop().await;
}

/// A client that sends its headers promptly and then the body one byte per second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_off() {
    let server = TestServer::start_with(|config| {
        config.header_read_timeout = Duration::from_secs(1);
        config.body_read_timeout = Duration::from_secs(2);
    })
    .await;
    let addr = server.addr;
    let auth = format!("Bearer {}", token(&unique_user("fault-slow-body")));
    let closed = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(
                format!(
                    "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                     Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let started = Instant::now();
        let mut buffer = [0u8; 1024];
        while started.elapsed() < Duration::from_secs(12) {
            if stream.write_all(b" ").is_err() {
                return Some(started.elapsed());
            }
            match stream.read(&mut buffer) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => return Some(started.elapsed()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    })
    .await
    .unwrap();
    assert!(
        closed.is_some(),
        "a body trickling one byte per second was still being read after 12 s"
    );
    server.stop().await;
}
