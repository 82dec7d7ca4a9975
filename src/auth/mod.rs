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
pub(crate) mod jwt;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::clock::unix_now;
use crate::protocol::ErrorCode;

pub use devkeys::sign_raw;
pub use jwt::{decode_header, verify_token, KeySet, Rules};

use cache::VerifiedCache;

/// The identity facts the sync server relies on after verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    pub(crate) email: Option<String>,
    pub(crate) role: Option<String>,
    pub(crate) sid: Option<String>,
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
    pub(crate) fn code(&self) -> ErrorCode {
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
pub(crate) fn bearer_token(authorization_header: Option<&str>) -> Result<&str, AuthError> {
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
    pub(crate) jwks_url: Option<String>,
    /// Local JWKS file for development; combined with the URL if both set.
    pub(crate) jwks_file: Option<PathBuf>,
    /// Required `iss`; `None` = not checked.
    pub(crate) issuer: Option<String>,
    /// Audience that `aud` must contain; `None` = not checked.
    pub(crate) audience: Option<String>,
    /// Clock-skew tolerance for `exp`/`nbf`.
    pub(crate) leeway: Duration,
    /// Period of the background refresh.
    pub(crate) refresh_interval: Duration,
    /// Minimum time between refreshes triggered by unknown `kid`s.
    pub min_refresh_gap: Duration,
    /// Upper bound on one JWKS fetch.
    pub(crate) fetch_timeout: Duration,
    /// Successfully verified tokens remembered so that a repeated token
    /// skips the signature check (0 disables); see `cache` for the rules.
    pub(crate) verified_cache_size: usize,
    /// Roots for an `https://` JWKS URL.
    pub(crate) tls: crate::client_tls::OutboundTls,
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
    pub(crate) fn new(config: AuthConfig) -> Self {
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
    pub(crate) fn verified_cache_stats(&self) -> (u64, u64) {
        self.inner.verified.stats()
    }

    /// Tokens currently in the verified-token cache.
    #[cfg(test)]
    pub(crate) fn verified_cache_len(&self) -> usize {
        self.inner.verified.len()
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
                Ok(n)
            }
            (loaded, errors) => {
                if !loaded.is_empty() {
                    self.update_keys(|keys| keys.merge(loaded));
                }
                let msg = errors.join("; ");
                inner.failures.fetch_add(1, Ordering::Relaxed);
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

    /// The periodic refresh, as a task for the server's tracker: every `refresh_interval`, the first one
    /// interval after start (start-up has just refreshed; a token naming an unknown kid refreshes sooner).
    /// It ends when `shutdown` is cancelled or once every `Authenticator` clone is dropped (it holds only a
    /// weak reference). A failure is logged and counted, never fatal: the keys already loaded stay.
    pub(crate) fn refresher(
        &self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        // A zero interval would spin; one second is far below any sane value.
        let interval = self
            .inner
            .config
            .refresh_interval
            .max(Duration::from_secs(1));
        async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = shutdown.cancelled() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                let auth = Authenticator { inner };
                tokio::select! {
                    refreshed = auth.refresh() => if let Err(e) = refreshed {
                        crate::log::warn(
                            "periodic signing key refresh failed; the keys already loaded stay in use",
                            &[("keys", auth.key_count().into()), ("error", e.into())],
                        );
                    },
                    () = shutdown.cancelled() => return,
                }
            }
        }
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
    pub(crate) async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
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
mod tests;
