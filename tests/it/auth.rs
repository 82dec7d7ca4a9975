//! Authentication over HTTP (SPEC §8): every way a token can be wrong is a 401 with a code that says which,
//! and keys come from a real JWKS endpoint that is cached, refreshed on an unknown `kid` at a limited rate,
//! and survives the endpoint going down.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use mana_sync::auth::{devkeys, sign_raw};
use mana_sync::clock::unix_now;
use serde_json::json;

use crate::support::{self, changeset, insert, keys, token, unique_user, Reply, TestServer, EPOCH};

const PULL: &str = "/sync/todo/pull?collection=tasks&since=1970-01-01T00:00:00.000Z";

async fn pull_with(server: &TestServer, authorization: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| vec![("authorization", value)])
        .unwrap_or_default();
    server.request("GET", PULL, &headers, None).await
}

async fn pull_bearer(server: &TestServer, token: &str) -> Reply {
    pull_with(server, Some(&format!("Bearer {token}"))).await
}

/// The header of a token from the trusted test key.
fn test_header() -> String {
    json!({"alg": "EdDSA", "kid": keys().kid, "typ": "JWT"}).to_string()
}

/// Claims signed with the trusted test key under `header`.
fn forge(header: &str, claims: serde_json::Value) -> String {
    sign_raw(header, &claims.to_string(), &keys().key)
}

fn valid_claims(user: &str) -> serde_json::Value {
    let now = unix_now();
    json!({"sub": user, "iat": now, "exp": now + 900, "aud": "mana"})
}

fn assert_401(reply: &Reply, code: &str) {
    reply.assert_error(401, code);
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer"),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_pulls_and_pushes() {
    let server = TestServer::start().await;
    let user = unique_user("auth-ok");
    let reply = pull_bearer(&server, &token(&user)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["serverChanges"], json!([]));

    let body = changeset(vec![insert("tasks", "t1", json!({"title": "a"}))]);
    let reply = server.push(&user, "todo", Some("dev-a"), &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(support::count_rows(&user).await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_non_bearer_authorization() {
    let server = TestServer::start().await;
    assert_401(&pull_with(&server, None).await, "missing_token");
    assert_401(&pull_with(&server, Some("Bearer")).await, "missing_token");
    assert_401(&pull_with(&server, Some("")).await, "missing_token");
    assert_401(
        &pull_with(&server, Some("Basic xyz")).await,
        "malformed_token",
    );
    assert_401(
        &pull_with(&server, Some("Bearer not-a-jwt")).await,
        "malformed_token",
    );

    // The scheme is case-insensitive.
    let user = unique_user("auth-scheme");
    let reply = pull_with(&server, Some(&format!("bearer {}", token(&user)))).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // A push without a token writes nothing.
    let user = unique_user("auth-nopush");
    let body = changeset(vec![insert("tasks", "t1", json!({"title": "a"}))]);
    let reply = server
        .request(
            "POST",
            "/sync/todo",
            &[("content-type", "application/json")],
            Some(body.to_string().into_bytes()),
        )
        .await;
    assert_401(&reply, "missing_token");
    assert_eq!(support::count_rows(&user).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims() {
    let server = TestServer::start().await;
    let user = unique_user("auth-time");
    let now = unix_now();

    // Far beyond the leeway (30 s) in the past.
    let expired = forge(
        &test_header(),
        json!({"sub": user, "iat": now - 7200, "exp": now - 3600, "aud": "mana"}),
    );
    assert_401(&pull_bearer(&server, &expired).await, "token_expired");

    let early = forge(
        &test_header(),
        json!({"sub": user, "iat": now, "nbf": now + 3600, "exp": now + 7200, "aud": "mana"}),
    );
    assert_401(&pull_bearer(&server, &early).await, "token_not_yet_valid");

    // Within the leeway both directions still pass.
    let skewed = forge(
        &test_header(),
        json!({"sub": user, "iat": now - 900, "nbf": now + 5, "exp": now - 5, "aud": "mana"}),
    );
    pull_bearer(&server, &skewed).await.assert_status(200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_and_algorithm() {
    let server = TestServer::start().await;
    let user = unique_user("auth-sig");
    let good = forge(&test_header(), valid_claims(&user));
    pull_bearer(&server, &good).await.assert_status(200);

    // Change one character near the start of the signature (the last one may only touch padding bits).
    let sig_start = good.rfind('.').unwrap() + 1;
    let mut bytes = good.clone().into_bytes();
    bytes[sig_start + 3] = if bytes[sig_start + 3] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_401(&pull_bearer(&server, &tampered).await, "bad_signature");

    // A valid signature over other claims, spliced in: also a bad signature.
    let other = forge(&test_header(), valid_claims("someone-else"));
    let (head, _) = good.rsplit_once('.').unwrap();
    let (_, other_sig) = other.rsplit_once('.').unwrap();
    assert_401(
        &pull_bearer(&server, &format!("{head}.{other_sig}")).await,
        "bad_signature",
    );

    // Signed by a key nobody trusts, under the trusted kid.
    let stranger = SigningKey::from_bytes(&[42; 32]);
    let foreign = sign_raw(&test_header(), &valid_claims(&user).to_string(), &stranger);
    assert_401(&pull_bearer(&server, &foreign).await, "bad_signature");

    // alg none with an empty signature.
    let none_header = json!({"alg": "none", "typ": "JWT"}).to_string();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(&none_header),
        URL_SAFE_NO_PAD.encode(valid_claims(&user).to_string())
    );
    assert_401(
        &pull_bearer(&server, &unsigned).await,
        "unsupported_algorithm",
    );

    // alg none carrying a (real Ed25519) signature.
    let none_kid = json!({"alg": "none", "kid": keys().kid, "typ": "JWT"}).to_string();
    assert_401(
        &pull_bearer(&server, &forge(&none_kid, valid_claims(&user))).await,
        "unsupported_algorithm",
    );

    let hs256 = json!({"alg": "HS256", "kid": keys().kid, "typ": "JWT"}).to_string();
    assert_401(
        &pull_bearer(&server, &forge(&hs256, valid_claims(&user))).await,
        "unsupported_algorithm",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_and_audience() {
    let server = TestServer::start().await;
    let now = unix_now();
    let no_sub = forge(
        &test_header(),
        json!({"iat": now, "exp": now + 900, "aud": "mana"}),
    );
    assert_401(&pull_bearer(&server, &no_sub).await, "missing_subject");
    let empty_sub = forge(
        &test_header(),
        json!({"sub": "", "iat": now, "exp": now + 900, "aud": "mana"}),
    );
    assert_401(&pull_bearer(&server, &empty_sub).await, "missing_subject");

    // A subject the server cannot use as a user id.
    let huge_sub = forge(
        &test_header(),
        json!({"sub": "u".repeat(300), "iat": now, "exp": now + 900, "aud": "mana"}),
    );
    assert_401(&pull_bearer(&server, &huge_sub).await, "malformed_token");
    // Nor one with control characters (it ends up in log lines and outbound URLs).
    for sub in ["a\r\nb", "esc\u{1b}[31m", "tab\t"] {
        let token = forge(
            &test_header(),
            json!({"sub": sub, "iat": now, "exp": now + 900, "aud": "mana"}),
        );
        assert_401(&pull_bearer(&server, &token).await, "malformed_token");
    }

    let user = unique_user("auth-aud");
    let wrong_aud = forge(
        &test_header(),
        json!({"sub": user, "iat": now, "exp": now + 900, "aud": "not-mana"}),
    );
    assert_401(&pull_bearer(&server, &wrong_aud).await, "wrong_audience");
    let no_aud = forge(
        &test_header(),
        json!({"sub": user, "iat": now, "exp": now + 900}),
    );
    assert_401(&pull_bearer(&server, &no_aud).await, "wrong_audience");
    let aud_list = forge(
        &test_header(),
        json!({"sub": user, "iat": now, "exp": now + 900, "aud": ["other", "mana"]}),
    );
    pull_bearer(&server, &aud_list).await.assert_status(200);

    // An unknown kid from the trusted key.
    let unknown = json!({"alg": "EdDSA", "kid": "no-such-kid", "typ": "JWT"}).to_string();
    assert_401(
        &pull_bearer(&server, &forge(&unknown, valid_claims(&user))).await,
        "unknown_key",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_is_checked_when_configured() {
    let server =
        TestServer::start_with(|config| config.jwt_issuer = Some("https://auth.example".into()))
            .await;
    let user = unique_user("auth-iss");
    let k = keys();
    let mint = |issuer: Option<&str>| {
        devkeys::mint_token(
            &k.kid,
            &k.key,
            &user,
            Duration::from_secs(900),
            issuer,
            Some("mana"),
            unix_now(),
        )
    };
    assert_401(&pull_bearer(&server, &mint(None)).await, "wrong_issuer");
    assert_401(
        &pull_bearer(&server, &mint(Some("https://evil.example"))).await,
        "wrong_issuer",
    );
    let reply = pull_bearer(&server, &mint(Some("https://auth.example"))).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;

    // Without JWT_ISSUER any (or no) issuer passes.
    let server = TestServer::start().await;
    pull_bearer(&server, &mint(Some("https://evil.example")))
        .await
        .assert_status(200);
    server.stop().await;
}

// ---- JWKS over real HTTP ---------------------------------------------------------------------------------

/// A minimal JWKS endpoint: answers every GET with `body` (500 while it is `None`), counts requests and
/// remembers when the last one arrived.
struct JwksEndpoint {
    url: String,
    addr: SocketAddr,
    body: Arc<Mutex<Option<String>>>,
    /// Answer 500 from this request number on (1-based), whatever `body` holds.
    fail_from: Arc<Mutex<Option<usize>>>,
    hits: Arc<AtomicUsize>,
    last_hit: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksEndpoint {
    fn start(body: Option<String>) -> JwksEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let fail_from = Arc::new(Mutex::new(None));
        let hits = Arc::new(AtomicUsize::new(0));
        let last_hit = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (body, fail_from, hits, last_hit, stop) = (
                body.clone(),
                fail_from.clone(),
                hits.clone(),
                last_hit.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                    *last_hit.lock().unwrap() = Some(Instant::now());
                    let failing = fail_from.lock().unwrap().is_some_and(|from| n >= from);
                    let answer = if failing {
                        None
                    } else {
                        body.lock().unwrap().clone()
                    };
                    let _ = answer_one(stream, answer);
                }
            })
        };
        JwksEndpoint {
            url: format!("http://{addr}/api/auth/jwks"),
            addr,
            body,
            fail_from,
            hits,
            last_hit,
            stop,
            thread: Some(thread),
        }
    }

    fn publish(&self, body: Option<String>) {
        *self.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Waits (safety net: 30 s) until the endpoint has been asked `n` times.
    async fn wait_for_hits(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.hits() < n {
            assert!(
                Instant::now() < deadline,
                "JWKS endpoint got {} requests, expected {n}",
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops answering: the listening socket is closed, so connects are refused.
    fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for JwksEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}

fn answer_one(mut stream: TcpStream, body: Option<String>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let (status, body) = match body {
        Some(body) => ("200 OK", body),
        None => (
            "500 Internal Server Error",
            r#"{"error":"down"}"#.to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

fn jwk(kid: &str, key: &SigningKey) -> serde_json::Value {
    json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        "kid": kid,
    })
}

fn jwks(keys: &[(&str, &SigningKey)]) -> String {
    let keys: Vec<_> = keys.iter().map(|(kid, key)| jwk(kid, key)).collect();
    json!({ "keys": keys }).to_string()
}

fn token_from(kid: &str, key: &SigningKey, user: &str) -> String {
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

/// A mana-sync server whose only key source is `endpoint`. Start-up fetches the JWKS once (`startup::build`;
/// the periodic refresher's first run is one interval later); this waits for it so that later hit counts
/// are the server's reaction to requests alone.
async fn server_on(endpoint: &JwksEndpoint) -> TestServer {
    let url = endpoint.url.clone();
    let server = TestServer::start_with(move |config| {
        config.jwks_url = Some(url);
        config.jwks_file = None;
    })
    .await;
    endpoint.wait_for_hits(1).await;
    support::wait_until(
        "the start-up refresh finishes",
        Duration::from_secs(30),
        || async {
            let (ok, failed) = server.shared.auth.refresh_stats();
            ok + failed >= 1
        },
    )
    .await;
    server
}

/// The server-side minimum gap between kid-miss refreshes (`AuthConfig::default().min_refresh_gap`); it is
/// not reachable through `Config`, so the rotation test has to wait it out once.
fn min_refresh_gap() -> Duration {
    mana_sync::auth::AuthConfig::default().min_refresh_gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_key_rotation_is_picked_up_on_unknown_kid() {
    let k1 = SigningKey::from_bytes(&[1; 32]);
    let k2 = SigningKey::from_bytes(&[2; 32]);
    let endpoint = JwksEndpoint::start(Some(jwks(&[("k1", &k1)])));
    let server = server_on(&endpoint).await;
    let user = unique_user("auth-rotate");

    pull_bearer(&server, &token_from("k1", &k1, &user))
        .await
        .assert_status(200);
    // k2 is not published yet.
    assert_401(
        &pull_bearer(&server, &token_from("k2", &k2, &user)).await,
        "unknown_key",
    );

    // Rotation: k2 is published. A kid miss refreshes the keys, but at most once per minimum gap counted
    // from the previous refresh (here: the start-up fetches), and that gap cannot be shortened through
    // Config, so wait it out once. The last hit is later than the server's last refresh attempt began, so
    // sleeping past it plus the gap is enough.
    endpoint.publish(Some(jwks(&[("k1", &k1), ("k2", &k2)])));
    let last = endpoint.last_hit.lock().unwrap().expect("fetched at start");
    let wake = last + min_refresh_gap() + Duration::from_millis(1500);
    tokio::time::sleep(wake.saturating_duration_since(Instant::now())).await;

    let before = endpoint.hits();
    let reply = pull_bearer(&server, &token_from("k2", &k2, &user)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        endpoint.hits(),
        before + 1,
        "exactly one refresh for the miss"
    );

    // Both keys work now, without further fetches.
    for _ in 0..3 {
        pull_bearer(&server, &token_from("k1", &k1, &user))
            .await
            .assert_status(200);
        pull_bearer(&server, &token_from("k2", &k2, &user))
            .await
            .assert_status(200);
    }
    assert_eq!(endpoint.hits(), before + 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_endpoint_down_keeps_cached_keys() {
    let k1 = SigningKey::from_bytes(&[3; 32]);
    let mut endpoint = JwksEndpoint::start(Some(jwks(&[("k1", &k1)])));
    // Only the very first fetch (in start-up) succeeds; the next refresh (the periodic one's stand-in) gets
    // a 500.
    *endpoint.fail_from.lock().unwrap() = Some(2);
    let server = server_on(&endpoint).await;
    let user = unique_user("auth-down");
    assert!(server.shared.auth.refresh().await.is_err());

    let reply = pull_bearer(&server, &token_from("k1", &k1, &user)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let (ok, failed) = server.shared.auth.refresh_stats();
    assert_eq!((ok, failed), (1, 1), "one good fetch, then a 500");

    // More failing refreshes: a 500, then the endpoint gone altogether.
    assert!(server.shared.auth.refresh().await.is_err());
    pull_bearer(&server, &token_from("k1", &k1, &user))
        .await
        .assert_status(200);
    endpoint.close();
    assert!(server.shared.auth.refresh().await.is_err());
    let body = changeset(vec![insert("tasks", "t1", json!({"title": "still here"}))]);
    let reply = server
        .request(
            "POST",
            "/sync/todo",
            &[
                (
                    "authorization",
                    &format!("Bearer {}", token_from("k1", &k1, &user)),
                ),
                ("content-type", "application/json"),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(support::count_rows(&user).await, 1);
    // An unknown kid is still a client error, not an outage.
    let stranger = SigningKey::from_bytes(&[4; 32]);
    assert_401(
        &pull_bearer(&server, &token_from("k9", &stranger, &user)).await,
        "unknown_key",
    );
    assert_eq!(server.shared.auth.key_count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kids_do_not_flood_the_jwks_endpoint() {
    let k1 = SigningKey::from_bytes(&[5; 32]);
    let endpoint = JwksEndpoint::start(Some(jwks(&[("k1", &k1)])));
    let server = server_on(&endpoint).await;
    let user = unique_user("auth-flood");
    let before = endpoint.hits();
    for i in 0..20 {
        let kid = format!("random-{i}-{}", unix_now());
        assert_401(
            &pull_bearer(&server, &token_from(&kid, &k1, &user)).await,
            "unknown_key",
        );
    }
    let extra = endpoint.hits() - before;
    assert!(extra <= 1, "20 unknown kids caused {extra} JWKS fetches");
    // Valid tokens were never affected.
    pull_bearer(&server, &token_from("k1", &k1, &user))
        .await
        .assert_status(200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_request_uses_same_auth() {
    let server = TestServer::start().await;
    let user = unique_user("auth-push");
    let now = unix_now();
    let expired = forge(
        &test_header(),
        json!({"sub": user, "iat": now - 7200, "exp": now - 3600, "aud": "mana"}),
    );
    let body = json!({"since": EPOCH, "changes": [insert("tasks", "t1", json!({"x": 1}))]});
    let auth = format!("Bearer {expired}");
    let reply = server
        .request(
            "POST",
            "/sync/todo",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await;
    assert_401(&reply, "token_expired");
    assert_eq!(support::count_rows(&user).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_keys_at_all_is_503_not_401() {
    // The JWKS endpoint refuses connections and there is no file: no token can be verified. That is the
    // server's problem, not the client's, so it must not look like a bad token (which would log users out).
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = TestServer::start_with(move |config| {
        config.jwks_url = Some(format!("http://{addr}/api/auth/jwks"));
        config.jwks_file = None;
    })
    .await;
    let user = unique_user("auth-nokeys");
    let reply = pull_bearer(&server, &token(&user)).await;
    reply.assert_error(503, "keys_unavailable");
    let retry = reply.header("retry-after").expect("Retry-After");
    assert!(retry.parse::<u32>().is_ok_and(|s| s >= 1), "{retry}");
    // A request without any token is still the client's fault.
    assert_401(&pull_with(&server, None).await, "missing_token");
    server.stop().await;
}
