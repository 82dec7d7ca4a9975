use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize};

#[test]
fn bearer_parsing() {
    assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
    assert_eq!(bearer_token(Some("bearer   abc  ")), Ok("abc"));
    assert_eq!(bearer_token(Some("  BEARER\tabc")), Ok("abc"));
    assert_eq!(bearer_token(None), Err(AuthError::MissingToken));
    assert_eq!(bearer_token(Some("")), Err(AuthError::MissingToken));
    assert_eq!(bearer_token(Some("   ")), Err(AuthError::MissingToken));
    assert_eq!(bearer_token(Some("Bearer")), Err(AuthError::MissingToken));
    assert_eq!(
        bearer_token(Some("Bearer   ")),
        Err(AuthError::MissingToken)
    );
    assert!(matches!(
        bearer_token(Some("Basic dXNlcjpwYXNz")),
        Err(AuthError::Malformed(_))
    ));
    assert!(matches!(
        bearer_token(Some("Bearerabc")),
        Err(AuthError::Malformed(_))
    ));
    assert!(matches!(
        bearer_token(Some("abc.def.ghi")),
        Err(AuthError::Malformed(_))
    ));
}

#[test]
fn error_codes_and_messages() {
    let all = [
        AuthError::MissingToken,
        AuthError::Malformed("x".into()),
        AuthError::UnsupportedAlgorithm("HS256".into()),
        AuthError::UnknownKey,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::MissingSubject,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::KeysUnavailable,
    ];
    let codes: Vec<ErrorCode> = all.iter().map(AuthError::code).collect();
    assert_eq!(
        codes,
        [
            "missing_token",
            "malformed_token",
            "unsupported_algorithm",
            "unknown_key",
            "bad_signature",
            "token_expired",
            "token_not_yet_valid",
            "missing_subject",
            "wrong_issuer",
            "wrong_audience",
            "keys_unavailable"
        ]
    );
    for e in &all {
        assert!(!e.to_string().is_empty());
    }
}

// ---- a tiny real HTTP server -------------------------------------

struct JwksServer {
    url: String,
    response: Arc<std::sync::Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(status: u16, body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let response = Arc::new(std::sync::Mutex::new((status, body)));
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, h, s) = (response.clone(), hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let (status, body) = r.lock().unwrap().clone();
                let _ = serve_one(stream, status, &body);
            }
            // Dropping the listener here makes later connects fail.
        });
        JwksServer {
            url: format!("http://{addr}/api/auth/jwks"),
            response,
            hits,
            stop,
            addr,
            thread: Some(thread),
        }
    }

    fn set(&self, status: u16, body: String) {
        *self.response.lock().unwrap() = (status, body);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes the listening socket.
    fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.close();
    }
}

fn serve_one(mut stream: TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

fn jwks_for(keys: &[(&str, &SigningKey)]) -> String {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(kid, k)| {
            serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(k.verifying_key().as_bytes()),
            })
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

fn token(kid: &str, key: &SigningKey) -> String {
    devkeys::mint_token(
        kid,
        key,
        "user-1",
        Duration::from_secs(300),
        Some("https://auth.test"),
        Some("mana"),
        unix_now(),
    )
}

fn config(url: &str, gap: Duration) -> AuthConfig {
    AuthConfig {
        jwks_url: Some(url.to_string()),
        issuer: Some("https://auth.test".into()),
        audience: Some("mana".into()),
        min_refresh_gap: gap,
        fetch_timeout: Duration::from_secs(3),
        ..AuthConfig::default()
    }
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

#[tokio::test]
async fn fetch_then_verify() {
    let k1 = key(1);
    let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
    let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
    assert_eq!(auth.refresh().await, Ok(1));
    assert_eq!(auth.key_count(), 1);
    let claims = auth.verify(&token("k1", &k1)).await.unwrap();
    assert_eq!(claims.sub, "user-1");
    assert_eq!(server.hits(), 1);
    // Wrong key under a known kid does not trigger a refresh.
    assert_eq!(
        auth.verify(&token("k1", &key(2))).await,
        Err(AuthError::BadSignature)
    );
    assert_eq!(server.hits(), 1);
    assert_eq!(auth.refresh_stats(), (1, 0));
}

#[tokio::test]
async fn key_rotation_triggers_one_refresh() {
    let (old, new) = (key(1), key(2));
    let server = JwksServer::start(200, jwks_for(&[("old", &old)]));
    let auth = Authenticator::new(config(&server.url, Duration::ZERO));
    auth.refresh().await.unwrap();
    server.set(200, jwks_for(&[("new", &new)]));
    let claims = auth.verify(&token("new", &new)).await.unwrap();
    assert_eq!(claims.sub, "user-1");
    assert_eq!(server.hits(), 2);
    // The rotated-out key is gone after a full successful refresh.
    assert_eq!(auth.key_count(), 1);
    assert_eq!(
        auth.verify(&token("new", &new)).await.map(|c| c.sub),
        Ok("user-1".into())
    );
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn unknown_kids_are_rate_limited() {
    let k1 = key(1);
    let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
    let gap = Duration::from_millis(1500);
    let auth = Authenticator::new(config(&server.url, gap));
    auth.refresh().await.unwrap();
    assert_eq!(server.hits(), 1);

    // Within the gap of the initial refresh: no fetch at all.
    for i in 0..50 {
        let kid = format!("random-{i}");
        assert_eq!(
            auth.verify(&token(&kid, &k1)).await,
            Err(AuthError::UnknownKey)
        );
    }
    assert_eq!(server.hits(), 1);

    // After the gap: 50 sequential misses cost exactly one fetch.
    tokio::time::sleep(gap + Duration::from_millis(100)).await;
    for i in 0..50 {
        let kid = format!("again-{i}");
        assert_eq!(
            auth.verify(&token(&kid, &k1)).await,
            Err(AuthError::UnknownKey)
        );
    }
    assert_eq!(server.hits(), 2);

    // After the gap again: 50 concurrent misses share one fetch.
    tokio::time::sleep(gap + Duration::from_millis(100)).await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let auth = auth.clone();
            let t = token(&format!("concurrent-{i}"), &k1);
            tokio::spawn(async move { auth.verify(&t).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Err(AuthError::UnknownKey));
    }
    assert_eq!(server.hits(), 3);
    // Valid tokens were never affected.
    assert!(auth.verify(&token("k1", &k1)).await.is_ok());
}

#[tokio::test]
async fn cached_keys_survive_endpoint_failures() {
    let k1 = key(1);
    let mut server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
    let auth = Authenticator::new(config(&server.url, Duration::ZERO));
    auth.refresh().await.unwrap();
    let t = token("k1", &k1);

    server.set(500, "oops".into());
    let err = auth.refresh().await.unwrap_err();
    assert!(err.contains("500"), "{err}");
    assert!(auth.verify(&t).await.is_ok());

    server.set(200, "<html>not json</html>".into());
    assert!(auth.refresh().await.is_err());
    assert!(auth.verify(&t).await.is_ok());

    server.set(200, r#"{"keys":[]}"#.into());
    assert!(auth.refresh().await.is_err());
    assert!(auth.verify(&t).await.is_ok());

    server.close();
    assert!(auth.refresh().await.is_err());
    assert!(auth.verify(&t).await.is_ok());
    // A kid miss with the endpoint down still answers UnknownKey.
    assert_eq!(
        auth.verify(&token("other", &k1)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(auth.key_count(), 1);
    let (ok, failed) = auth.refresh_stats();
    assert_eq!(ok, 1);
    assert!(failed >= 4, "{failed}");
}

#[tokio::test]
async fn never_loaded_and_endpoint_down_is_keys_unavailable() {
    // Bind and drop to get a port that refuses connections.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/jwks");
    let auth = Authenticator::new(config(&url, Duration::from_secs(60)));
    let t = token("k1", &key(1));
    assert_eq!(auth.verify(&t).await, Err(AuthError::KeysUnavailable));
    // Still unavailable (not unknown_key) while rate-limited.
    assert_eq!(auth.verify(&t).await, Err(AuthError::KeysUnavailable));
    assert_eq!(auth.refresh_stats(), (0, 1));
    assert_eq!(auth.key_count(), 0);
}

#[tokio::test]
async fn no_source_configured_is_an_error() {
    let auth = Authenticator::new(AuthConfig::default());
    assert!(auth.refresh().await.unwrap_err().contains("no JWKS source"));
    assert_eq!(
        auth.verify(&token("k1", &key(1))).await,
        Err(AuthError::KeysUnavailable)
    );
}

#[tokio::test]
async fn partial_failure_keeps_old_keys_and_merges_new() {
    let (k1, k2) = (key(1), key(2));
    let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
    let tmp = devkeys_tmp("partial");
    let file = tmp.join("jwks.json");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(&file, jwks_for(&[("k2", &k2)])).unwrap();
    let auth = Authenticator::new(AuthConfig {
        jwks_file: Some(file.clone()),
        ..config(&server.url, Duration::ZERO)
    });
    assert_eq!(auth.refresh().await, Ok(2));
    // URL breaks, file gains a key: old URL key kept, file key added.
    server.set(503, String::new());
    let k3 = key(3);
    std::fs::write(&file, jwks_for(&[("k2", &k2), ("k3", &k3)])).unwrap();
    assert!(auth.refresh().await.is_err());
    assert_eq!(auth.key_count(), 3);
    for (kid, k) in [("k1", &k1), ("k2", &k2), ("k3", &k3)] {
        assert!(auth.verify(&token(kid, k)).await.is_ok(), "{kid}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

fn devkeys_tmp(tag: &str) -> PathBuf {
    let n = devkeys::generate_signing_key().unwrap().to_bytes();
    std::env::temp_dir().join(format!(
        "mana-auth-{tag}-{}",
        n[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// The refresher leaves the first load to start-up and refreshes one interval later (here the floor of
/// one second), then ends at shutdown in the middle of its next wait.
#[tokio::test]
async fn refresher_refreshes_every_interval_and_ends_at_shutdown() {
    let k1 = key(1);
    let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
    let auth = Authenticator::new(AuthConfig {
        refresh_interval: Duration::from_millis(1),
        ..config(&server.url, Duration::from_secs(60))
    });
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(auth.refresher(shutdown.clone()));
    assert_eq!(
        server.hits(),
        0,
        "start-up does the first load, not the refresher"
    );
    for _ in 0..250 {
        if auth.key_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(auth.key_count(), 1);
    assert!(auth.verify(&token("k1", &k1)).await.is_ok());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the refresher ends when shutdown is cancelled")
        .unwrap();
}

mod cache;
