//! Authentication of sync clients by Better Auth JWTs.
//!
//! This module owns the trust boundary between HTTP requests and user
//! identities: extracting the bearer token, keeping an up-to-date cache of
//! the identity server's public keys, and turning a token into [`Claims`].
//! The pure cryptographic checks live in [`jwt`] (fuzzable, clock-free), key
//! documents in [`jwks`], developer tooling in [`devkeys`], the cache of
//! already verified tokens in `cache`; this file adds the stateful part —
//! key caching and refresh policy — because that is where availability
//! (keep serving with cached keys) and abuse resistance (unknown `kid`s
//! must not turn into a fetch storm) are decided.

mod cache;
pub mod devkeys;
pub mod jwks;
pub mod jwt;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::clock::unix_now;
use crate::protocol::ErrorCode;

pub use devkeys::sign_raw;
pub use jwt::{decode_header, verify_token, Header, KeySet, Rules};

use cache::VerifiedCache;

/// The identity facts the sync server relies on after verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    pub email: Option<String>,
    pub role: Option<String>,
    pub sid: Option<String>,
}

/// Why a request was not authenticated. Each variant maps to a stable
/// [`code`](AuthError::code) that clients and logs can match on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    MissingToken,
    Malformed(String),
    UnsupportedAlgorithm(String),
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    MissingSubject,
    WrongIssuer,
    WrongAudience,
    KeysUnavailable,
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::MissingToken => ErrorCode::MissingToken,
            AuthError::Malformed(_) => ErrorCode::MalformedToken,
            AuthError::UnsupportedAlgorithm(_) => ErrorCode::UnsupportedAlgorithm,
            AuthError::UnknownKey => ErrorCode::UnknownKey,
            AuthError::BadSignature => ErrorCode::BadSignature,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::NotYetValid => ErrorCode::TokenNotYetValid,
            AuthError::MissingSubject => ErrorCode::MissingSubject,
            AuthError::WrongIssuer => ErrorCode::WrongIssuer,
            AuthError::WrongAudience => ErrorCode::WrongAudience,
            AuthError::KeysUnavailable => ErrorCode::KeysUnavailable,
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::MissingToken => write!(f, "no bearer token in the Authorization header"),
            AuthError::Malformed(why) => write!(f, "malformed token: {why}"),
            AuthError::UnsupportedAlgorithm(alg) => {
                write!(f, "token algorithm {alg:?} is not accepted (only EdDSA)")
            }
            AuthError::UnknownKey => write!(f, "token was signed with an unknown key id"),
            AuthError::BadSignature => write!(f, "token signature is invalid"),
            AuthError::Expired => write!(f, "token has expired"),
            AuthError::NotYetValid => write!(f, "token is not valid yet (nbf in the future)"),
            AuthError::MissingSubject => write!(f, "token has no subject (sub) claim"),
            AuthError::WrongIssuer => write!(f, "token issuer (iss) is not the expected one"),
            AuthError::WrongAudience => {
                write!(f, "token audience (aud) does not include this service")
            }
            AuthError::KeysUnavailable => {
                write!(f, "no signing keys are available to verify the token")
            }
        }
    }
}

impl std::error::Error for AuthError {}

/// Extracts the token from an `Authorization` header value.
pub fn bearer_token(authorization_header: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization_header
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(AuthError::MissingToken)?;
    let (scheme, rest) = match value.split_once(|c: char| c.is_ascii_whitespace()) {
        Some((s, r)) => (s, r.trim()),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed(
            "Authorization scheme is not Bearer".into(),
        ));
    }
    if rest.is_empty() {
        return Err(AuthError::MissingToken);
    }
    Ok(rest)
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `http://` or `https://` JWKS endpoint of Better Auth (fetched with ureq).
    pub jwks_url: Option<String>,
    /// Local JWKS file for development; combined with the URL if both set.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`; `None` = not checked.
    pub issuer: Option<String>,
    /// Audience that `aud` must contain; `None` = not checked.
    pub audience: Option<String>,
    /// Clock-skew tolerance for `exp`/`nbf`.
    pub leeway: Duration,
    /// Period of the background refresh.
    pub refresh_interval: Duration,
    /// Minimum time between refreshes triggered by unknown `kid`s.
    pub min_refresh_gap: Duration,
    /// Upper bound on one JWKS fetch.
    pub fetch_timeout: Duration,
    /// Successfully verified tokens remembered so that a repeated token
    /// skips the signature check (0 disables); see `cache` for the rules.
    pub verified_cache_size: usize,
    /// Roots for an `https://` JWKS URL.
    pub tls: crate::client_tls::OutboundTls,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwks_url: None,
            jwks_file: None,
            issuer: None,
            audience: Some("mana".to_string()),
            leeway: Duration::from_secs(30),
            refresh_interval: Duration::from_secs(600),
            min_refresh_gap: Duration::from_secs(15),
            fetch_timeout: Duration::from_secs(5),
            verified_cache_size: 100_000,
            tls: crate::client_tls::OutboundTls::web_roots(),
        }
    }
}

struct Inner {
    config: AuthConfig,
    keys: RwLock<KeySet>,
    /// Bumped, while `keys` is write-locked, whenever the key set actually
    /// changes; cached verifications from an older generation re-check
    /// their key before they are trusted.
    key_generation: AtomicU64,
    verified: VerifiedCache,
    /// Start of the most recent refresh attempt of any kind; `None` before
    /// the first. Used to rate-limit kid-miss refreshes.
    last_attempt: Mutex<Option<Instant>>,
    /// Bumped after every finished attempt, so a waiter on `refresh_lock`
    /// can tell that someone else refreshed while it waited.
    attempts_done: AtomicU64,
    /// Serialises refreshes: concurrent kid misses share one fetch.
    refresh_lock: tokio::sync::Mutex<()>,
    ok: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Verifies tokens against a cached, periodically refreshed JWKS.
/// Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.key_count())
            .field("stats", &self.refresh_stats())
            .finish()
    }
}

impl Authenticator {
    pub fn new(config: AuthConfig) -> Self {
        let verified = VerifiedCache::new(config.verified_cache_size, leeway_secs(&config));
        Authenticator {
            inner: Arc::new(Inner {
                config,
                keys: RwLock::new(KeySet::new()),
                key_generation: AtomicU64::new(0),
                verified,
                last_attempt: Mutex::new(None),
                attempts_done: AtomicU64::new(0),
                refresh_lock: tokio::sync::Mutex::new(()),
                ok: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        }
    }

    pub fn key_count(&self) -> usize {
        self.inner.keys.read().len()
    }

    /// `(successful refreshes, failed refreshes)` since creation.
    pub fn refresh_stats(&self) -> (u64, u64) {
        (
            self.inner.ok.load(Ordering::Relaxed),
            self.inner.failures.load(Ordering::Relaxed),
        )
    }

    /// `(hits, misses)` of the verified-token cache since creation. A hit
    /// skipped the signature check; a miss went on to a full verification.
    /// Both stay 0 when the cache is disabled.
    pub fn verified_cache_stats(&self) -> (u64, u64) {
        self.inner.verified.stats()
    }

    /// Tokens currently in the verified-token cache.
    pub fn verified_cache_len(&self) -> usize {
        self.inner.verified.len()
    }

    /// The error of the latest refresh, cleared by the next success; for
    /// health endpoints and logs.
    pub fn last_refresh_error(&self) -> Option<String> {
        self.inner.last_error.lock().clone()
    }

    /// Fetches all configured sources now.
    ///
    /// On full success the cache is replaced, so keys removed upstream stop
    /// being accepted. On any failure the previous keys are kept (merged
    /// with whatever did load), because an identity-server outage must not
    /// log every user out.
    pub async fn refresh(&self) -> Result<usize, String> {
        let _guard = self.inner.refresh_lock.lock().await;
        self.refresh_locked().await
    }

    /// The body of [`refresh`](Self::refresh); caller holds `refresh_lock`.
    async fn refresh_locked(&self) -> Result<usize, String> {
        let inner = &self.inner;
        *inner.last_attempt.lock() = Some(Instant::now());
        let result = self.load_sources().await;
        let outcome = match result {
            (loaded, errors) if errors.is_empty() => {
                let n = loaded.len();
                self.update_keys(|keys| *keys = loaded);
                inner.ok.fetch_add(1, Ordering::Relaxed);
                *inner.last_error.lock() = None;
                Ok(n)
            }
            (loaded, errors) => {
                if !loaded.is_empty() {
                    self.update_keys(|keys| keys.merge(loaded));
                }
                let msg = errors.join("; ");
                inner.failures.fetch_add(1, Ordering::Relaxed);
                *inner.last_error.lock() = Some(msg.clone());
                Err(msg)
            }
        };
        inner.attempts_done.fetch_add(1, Ordering::Release);
        outcome
    }

    /// Applies `change` to the key set; if that changed it, bumps the
    /// generation so cached verifications re-check their key.
    fn update_keys(&self, change: impl FnOnce(&mut KeySet)) {
        let mut keys = self.inner.keys.write();
        let before = keys.clone();
        change(&mut keys);
        if *keys != before {
            self.inner.key_generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Loads every configured source; returns the union and the errors.
    async fn load_sources(&self) -> (KeySet, Vec<String>) {
        let cfg = &self.inner.config;
        let mut union = KeySet::new();
        let mut errors = Vec::new();
        if cfg.jwks_url.is_none() && cfg.jwks_file.is_none() {
            errors.push("no JWKS source configured (set jwks_url or jwks_file)".to_string());
        }
        // The outer timeout is a backstop in case ureq's own timeout does
        // not fire; the blocking thread is then abandoned, not cancelled.
        let backstop = cfg.fetch_timeout + Duration::from_secs(1);
        if let Some(url) = cfg.jwks_url.clone() {
            let timeout = cfg.fetch_timeout;
            let tls = cfg.tls.clone();
            let task =
                tokio::task::spawn_blocking(move || jwks::fetch_jwks_url(&url, timeout, &tls));
            match tokio::time::timeout(backstop, task).await {
                Ok(Ok(Ok(keys))) => union.merge(keys),
                Ok(Ok(Err(e))) => errors.push(e),
                Ok(Err(e)) => errors.push(format!("JWKS fetch task failed: {e}")),
                Err(_) => errors.push("JWKS fetch timed out".to_string()),
            }
        }
        if let Some(path) = cfg.jwks_file.clone() {
            let task = tokio::task::spawn_blocking(move || jwks::read_jwks_file(&path));
            match tokio::time::timeout(backstop, task).await {
                Ok(Ok(Ok(keys))) => union.merge(keys),
                Ok(Ok(Err(e))) => errors.push(e),
                Ok(Err(e)) => errors.push(format!("JWKS file task failed: {e}")),
                Err(_) => errors.push("reading JWKS file timed out".to_string()),
            }
        }
        (union, errors)
    }

    /// Starts the periodic refresh (first run immediately). The task holds
    /// only a weak reference and ends once every `Authenticator` clone is
    /// dropped; failures are recorded in the stats, never fatal.
    pub fn spawn_refresher(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        // A zero interval would spin; one second is far below any sane value.
        let interval = self
            .inner
            .config
            .refresh_interval
            .max(Duration::from_secs(1));
        tokio::spawn(async move {
            while let Some(inner) = weak.upgrade() {
                let auth = Authenticator { inner };
                let _ = auth.refresh().await;
                drop(auth);
                tokio::time::sleep(interval).await;
            }
        })
    }

    fn rules(&self) -> Rules<'_> {
        let cfg = &self.inner.config;
        Rules {
            issuer: cfg.issuer.as_deref(),
            audience: cfg.audience.as_deref(),
            leeway_secs: leeway_secs(cfg),
        }
    }

    /// The claims of an earlier successful verification of exactly this
    /// token, if a fresh one would succeed now too.
    fn remembered(&self, token: &str) -> Option<Claims> {
        let inner = &self.inner;
        let generation = inner.key_generation.load(Ordering::Acquire);
        inner
            .verified
            .get(token, unix_now(), generation, |kid, key| {
                inner
                    .keys
                    .read()
                    .select(kid)
                    .is_some_and(|k| k.as_bytes() == key)
            })
    }

    /// A full verification with the cached keys; successes are remembered.
    fn verify_with_keys(&self, token: &str) -> Result<Claims, AuthError> {
        let now = unix_now();
        let (result, generation) = {
            let keys = self.inner.keys.read();
            // Read under the lock: the generation of exactly these keys.
            let generation = self.inner.key_generation.load(Ordering::Acquire);
            match jwt::verify_token_detailed(token, &keys, now, &self.rules()) {
                Err(AuthError::UnknownKey) if keys.is_empty() => {
                    return Err(AuthError::KeysUnavailable)
                }
                result => (result, generation),
            }
        };
        let verified = result?;
        self.inner
            .verified
            .insert(token, &verified, generation, now);
        Ok(verified.claims)
    }

    /// Verifies a token with the cached keys.
    ///
    /// A token verified successfully before is answered from the
    /// verified-token cache (time window and key re-checked, no signature
    /// check) with the same result a full verification would give.
    ///
    /// An unknown `kid` usually means the identity server rotated keys, so
    /// it may trigger one refresh and a retry — but at most once per
    /// `min_refresh_gap`, and concurrent misses share that refresh, so
    /// tokens with made-up `kid`s cannot be used to hammer the endpoint.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if let Some(claims) = self.remembered(token) {
            return Ok(claims);
        }
        match self.verify_with_keys(token) {
            Err(AuthError::UnknownKey | AuthError::KeysUnavailable) => {}
            other => return other,
        }
        let seen = self.inner.attempts_done.load(Ordering::Acquire);
        {
            let _guard = self.inner.refresh_lock.lock().await;
            let someone_refreshed = self.inner.attempts_done.load(Ordering::Acquire) != seen;
            let gap_passed = match *self.inner.last_attempt.lock() {
                None => true,
                Some(t) => t.elapsed() > self.inner.config.min_refresh_gap,
            };
            if !someone_refreshed && gap_passed {
                // Failure is already recorded; the retry below reports the
                // outcome that matters to the caller.
                let _ = self.refresh_locked().await;
            }
        }
        self.verify_with_keys(token)
    }
}

fn leeway_secs(config: &AuthConfig) -> i64 {
    i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
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
        assert!(auth.last_refresh_error().is_some());
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

    #[tokio::test]
    async fn refresher_loads_immediately_and_stops_when_dropped() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        let handle = auth.spawn_refresher();
        for _ in 0..100 {
            if auth.key_count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(auth.key_count(), 1);
        assert!(auth.verify(&token("k1", &k1)).await.is_ok());
        drop(auth);
        // The loop notices the drop on its next wake-up; don't wait 10 min.
        handle.abort();
        assert_eq!(server.hits(), 1);
    }

    // ---- the verified-token cache --------------------------------------

    fn token_for(kid: &str, key: &SigningKey, sub: &str, ttl: Duration) -> String {
        devkeys::mint_token(
            kid,
            key,
            sub,
            ttl,
            Some("https://auth.test"),
            Some("mana"),
            unix_now(),
        )
    }

    /// What a full verification with the current keys says right now.
    fn fresh(auth: &Authenticator, token: &str) -> Result<Claims, AuthError> {
        verify_token(token, &auth.inner.keys.read(), unix_now(), &auth.rules())
    }

    /// `token` with one byte of its decoded signature flipped.
    fn tamper_signature(token: &str) -> String {
        let dot = token.rfind('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(&token[dot + 1..]).unwrap();
        sig[17] ^= 0x01;
        format!("{}.{}", &token[..dot], URL_SAFE_NO_PAD.encode(sig))
    }

    #[tokio::test]
    async fn repeat_verification_is_a_cache_hit() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        auth.refresh().await.unwrap();
        let t = token("k1", &k1);

        let first = auth.verify(&t).await.unwrap();
        assert_eq!(auth.verified_cache_stats(), (0, 1));
        assert_eq!(auth.verified_cache_len(), 1);
        for i in 1..=3 {
            assert_eq!(auth.verify(&t).await.as_ref(), Ok(&first));
            assert_eq!(auth.verified_cache_stats(), (i, 1));
        }
        assert_eq!(fresh(&auth, &t), Ok(first.clone()));
        assert_eq!(auth.verified_cache_len(), 1);

        // A hit really skips verification: with the keys emptied behind the
        // cache's back (no generation bump, which refresh would never do) the
        // cached answer still comes back, while a fresh check would fail.
        *auth.inner.keys.write() = KeySet::new();
        assert_eq!(auth.verify(&t).await, Ok(first));
        assert_eq!(auth.verified_cache_stats(), (4, 1));
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn expired_token_is_refused_even_when_cached() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(AuthConfig {
            leeway: Duration::ZERO,
            ..config(&server.url, Duration::from_secs(60))
        });
        auth.refresh().await.unwrap();
        let t = token_for("k1", &k1, "user-1", Duration::from_secs(1));

        let claims = auth.verify(&t).await.unwrap();
        assert_eq!(auth.verify(&t).await.as_ref(), Ok(&claims));
        assert_eq!(auth.verified_cache_stats(), (1, 1));

        // Leeway 0: refused from the first second after `exp`.
        while unix_now() <= claims.exp {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now_fresh = fresh(&auth, &t);
        assert_eq!(now_fresh, Err(AuthError::Expired));
        assert_eq!(auth.verify(&t).await, now_fresh);
        assert_eq!(auth.verified_cache_stats(), (1, 2));
        // The stale answer is gone, and errors are not remembered.
        assert_eq!(auth.verified_cache_len(), 0);
        assert_eq!(auth.verify(&t).await, Err(AuthError::Expired));
        assert_eq!(auth.verified_cache_stats(), (1, 3));
        assert_eq!(auth.verified_cache_len(), 0);
    }

    #[tokio::test]
    async fn rotated_out_key_cached_tokens_are_refused() {
        let (a, b) = (key(1), key(2));
        let server = JwksServer::start(200, jwks_for(&[("a", &a)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        auth.refresh().await.unwrap();
        let t = token("a", &a);
        let claims = auth.verify(&t).await.unwrap();
        assert_eq!(auth.verify(&t).await, Ok(claims));
        assert_eq!(auth.verified_cache_stats(), (1, 1));

        // Key A is rotated out: the endpoint now publishes only B.
        server.set(200, jwks_for(&[("b", &b)]));
        assert_eq!(auth.refresh().await, Ok(1));
        let now_fresh = fresh(&auth, &t);
        assert_eq!(now_fresh, Err(AuthError::UnknownKey));
        assert_eq!(auth.verify(&t).await, now_fresh);
        assert_eq!(auth.verified_cache_stats(), (1, 2));
        assert_eq!(auth.verified_cache_len(), 0);
        assert_eq!(auth.verify(&t).await, Err(AuthError::UnknownKey));
        // B's tokens work and are cached as usual.
        let tb = token("b", &b);
        assert!(auth.verify(&tb).await.is_ok());
        assert!(auth.verify(&tb).await.is_ok());
        assert_eq!(auth.verified_cache_stats(), (2, 4));
    }

    #[tokio::test]
    async fn replaced_key_under_the_same_kid_is_refused() {
        let (a, b) = (key(1), key(2));
        let server = JwksServer::start(200, jwks_for(&[("k1", &a)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        auth.refresh().await.unwrap();
        let t = token("k1", &a);
        auth.verify(&t).await.unwrap();
        assert!(auth.verify(&t).await.is_ok());
        assert_eq!(auth.verified_cache_stats(), (1, 1));

        server.set(200, jwks_for(&[("k1", &b)]));
        auth.refresh().await.unwrap();
        let now_fresh = fresh(&auth, &t);
        assert_eq!(now_fresh, Err(AuthError::BadSignature));
        assert_eq!(auth.verify(&t).await, now_fresh);
        assert_eq!(auth.verified_cache_stats(), (1, 2));
    }

    #[tokio::test]
    async fn key_set_changes_that_keep_the_key_keep_the_hit() {
        let (k1, k2) = (key(1), key(2));
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        auth.refresh().await.unwrap();
        let with_kid = token("k1", &k1);
        let claims = format!(
            r#"{{"sub":"u","iss":"https://auth.test","aud":"mana","exp":{}}}"#,
            unix_now() + 300
        );
        // Without a kid the only key of a one-key set is used.
        let no_kid = sign_raw(r#"{"alg":"EdDSA"}"#, &claims, &k1);
        for t in [&with_kid, &no_kid] {
            auth.verify(t).await.unwrap();
        }
        assert_eq!(auth.verified_cache_stats(), (0, 2));

        // The same keys again: nothing changes, not even the generation.
        auth.refresh().await.unwrap();
        assert_eq!(auth.inner.key_generation.load(Ordering::Relaxed), 1);
        for t in [&with_kid, &no_kid] {
            assert!(auth.verify(t).await.is_ok());
        }
        assert_eq!(auth.verified_cache_stats(), (2, 2));

        // k2 is added. k1 still selects the same key, so the kid token is
        // still a hit (after a re-check); the kid-less token no longer has
        // a single key to fall back on, exactly as a fresh check says.
        server.set(200, jwks_for(&[("k1", &k1), ("k2", &k2)]));
        auth.refresh().await.unwrap();
        assert_eq!(auth.inner.key_generation.load(Ordering::Relaxed), 2);
        assert!(auth.verify(&with_kid).await.is_ok());
        assert!(auth.verify(&with_kid).await.is_ok());
        assert_eq!(auth.verified_cache_stats(), (4, 2));
        assert_eq!(fresh(&auth, &no_kid), Err(AuthError::UnknownKey));
        assert_eq!(auth.verify(&no_kid).await, Err(AuthError::UnknownKey));
        assert_eq!(auth.verified_cache_stats(), (4, 3));
    }

    #[tokio::test]
    async fn cache_stays_within_its_bound() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(AuthConfig {
            verified_cache_size: 100,
            ..config(&server.url, Duration::from_secs(60))
        });
        auth.refresh().await.unwrap();
        let mut max = 0;
        let mut last = String::new();
        for i in 0..1000 {
            last = token_for("k1", &k1, &format!("user-{i}"), Duration::from_secs(300));
            let claims = auth.verify(&last).await.unwrap();
            assert_eq!(claims.sub, format!("user-{i}"));
            max = max.max(auth.verified_cache_len());
            assert!(auth.verified_cache_len() <= 100, "{i}");
        }
        // It filled a good part of its room (shards are cleared when full, so the total hovers around half
        // the bound; the maximum over 1,000 inserts lies well above 40), and still works.
        assert!(max > 40, "{max}");
        assert_eq!(auth.verified_cache_stats(), (0, 1000));
        assert_eq!(
            auth.verify(&last).await.map(|c| c.sub),
            Ok("user-999".into())
        );
        assert_eq!(auth.verified_cache_stats(), (1, 1000));
    }

    #[tokio::test]
    async fn tampered_copy_of_a_cached_token_is_refused() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        auth.refresh().await.unwrap();
        let t = token("k1", &k1);
        let claims = auth.verify(&t).await.unwrap();
        assert_eq!(auth.verify(&t).await.as_ref(), Ok(&claims));
        assert_eq!(auth.verified_cache_stats(), (1, 1));

        let forged = tamper_signature(&t);
        assert_ne!(forged, t);
        assert_eq!(auth.verify(&forged).await, Err(AuthError::BadSignature));
        assert_eq!(auth.verify(&forged).await, Err(AuthError::BadSignature));
        assert_eq!(auth.verified_cache_stats(), (1, 3));
        // The genuine token is unaffected.
        assert_eq!(auth.verify(&t).await, Ok(claims));
        assert_eq!(auth.verified_cache_stats(), (2, 3));
        assert_eq!(auth.verified_cache_len(), 1);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_size_zero_disables() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let auth = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        auth.refresh().await.unwrap();
        let wrong_key = token("k1", &key(2));
        for _ in 0..2 {
            assert_eq!(auth.verify(&wrong_key).await, Err(AuthError::BadSignature));
        }
        assert_eq!(auth.verified_cache_stats(), (0, 2));
        assert_eq!(auth.verified_cache_len(), 0);

        let off = Authenticator::new(AuthConfig {
            verified_cache_size: 0,
            ..config(&server.url, Duration::from_secs(60))
        });
        off.refresh().await.unwrap();
        let t = token("k1", &k1);
        for _ in 0..3 {
            assert_eq!(off.verify(&t).await.map(|c| c.sub), Ok("user-1".into()));
        }
        assert_eq!(off.verified_cache_stats(), (0, 0));
        assert_eq!(off.verified_cache_len(), 0);
    }

    /// Many tasks verifying while the key set flips between {k1} and
    /// {k1, k2}: every answer is right and nothing deadlocks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_verification_during_refreshes() {
        let (k1, k2) = (key(1), key(2));
        let server = Arc::new(JwksServer::start(200, jwks_for(&[("k1", &k1)])));
        let auth = Authenticator::new(AuthConfig {
            verified_cache_size: 8,
            ..config(&server.url, Duration::from_secs(60))
        });
        auth.refresh().await.unwrap();
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..12)
                .map(|i| token_for("k1", &k1, &format!("user-{i}"), Duration::from_secs(300)))
                .collect(),
        );
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (auth, tokens) = (auth.clone(), tokens.clone());
                tokio::spawn(async move {
                    for n in 0..60 {
                        let i = (w * 7 + n * 5) % tokens.len();
                        let claims = auth.verify(&tokens[i]).await.unwrap();
                        assert_eq!(claims.sub, format!("user-{i}"));
                    }
                })
            })
            .collect();
        let flipper = {
            let (auth, server) = (auth.clone(), server.clone());
            let (one, two) = (
                jwks_for(&[("k1", &k1)]),
                jwks_for(&[("k1", &k1), ("k2", &k2)]),
            );
            tokio::spawn(async move {
                for n in 0..10 {
                    server.set(200, if n % 2 == 0 { two.clone() } else { one.clone() });
                    auth.refresh().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        for w in workers {
            w.await.unwrap();
        }
        flipper.await.unwrap();
        let (hits, misses) = auth.verified_cache_stats();
        assert_eq!(hits + misses, 240);
        assert!(auth.verified_cache_len() <= 8);
    }

    /// Not a check, a measurement: `cargo test --release --lib
    /// verify_timing -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn verify_timing() {
        let k1 = key(1);
        let server = JwksServer::start(200, jwks_for(&[("k1", &k1)]));
        let cached = Authenticator::new(config(&server.url, Duration::from_secs(60)));
        let uncached = Authenticator::new(AuthConfig {
            verified_cache_size: 0,
            ..config(&server.url, Duration::from_secs(60))
        });
        cached.refresh().await.unwrap();
        uncached.refresh().await.unwrap();
        let t = token("k1", &k1);
        cached.verify(&t).await.unwrap();
        for (name, auth, n) in [
            ("uncached", &uncached, 2_000u32),
            ("cached", &cached, 200_000),
        ] {
            let start = Instant::now();
            for _ in 0..n {
                std::hint::black_box(auth.verify(std::hint::black_box(&t)).await.unwrap());
            }
            let per = start.elapsed() / n;
            println!(
                "{name:>8}: {per:?} per verify ({n} runs, token {} bytes)",
                t.len()
            );
        }
    }
}
