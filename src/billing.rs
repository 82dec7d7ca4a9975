//! The billing gate (SPEC §9): is sync active for this user?
//!
//! Asks mana-credits (`GET {url}/api/v1/internal/sync/status/{userId}` with `X-Service-Key`) with ureq on a
//! blocking thread, never on the async workers. Answers are cached per user (5 minutes by default) in a map
//! with a hard size bound; concurrent misses for one user share one outbound request. When mana-credits is
//! down, slow or answers nonsense, the gate fails open — the request is allowed and the failure counted — and
//! that answer is cached only briefly, so a recovering service is asked again soon.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::OnceCell;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Active,
    Inactive,
    /// mana-credits could not say (down, timeout, bad answer): allowed.
    FailedOpen,
}

#[derive(Debug, Clone)]
pub(crate) struct BillingConfig {
    pub(crate) url: String,
    pub(crate) service_key: Option<String>,
    pub(crate) cache_ttl: Duration,
    pub(crate) timeout: Duration,
    pub(crate) max_cached_users: usize,
    /// Roots for an `https://` URL.
    pub(crate) tls: crate::client_tls::OutboundTls,
}

/// Counters by outcome, for /metrics.
#[derive(Debug, Default)]
pub struct BillingStats {
    pub(crate) active: AtomicU64,
    pub inactive: AtomicU64,
    pub failed_open: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) requests: AtomicU64,
}

pub struct Billing {
    config: BillingConfig,
    /// One agent for every request: it keeps its connections (and its TLS set-up) between requests.
    agent: ureq::Agent,
    cache: Mutex<HashMap<String, (Verdict, Instant)>>,
    in_flight: Mutex<HashMap<String, Arc<OnceCell<Verdict>>>>,
    pub stats: BillingStats,
}

/// How long a failed-open answer is reused: long enough that an outage does not multiply outbound
/// requests, short enough to notice recovery.
const FAILED_OPEN_TTL: Duration = Duration::from_secs(10);

impl Billing {
    pub(crate) fn new(config: BillingConfig) -> Billing {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(config.timeout))
                .http_status_as_error(false)
                // A redirect is an answer we do not follow (it could point anywhere): not 200, so fail open.
                .max_redirects(0)
                .tls_config(config.tls.ureq())
                .build(),
        );
        Billing {
            agent,
            config,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            stats: BillingStats::default(),
        }
    }

    pub async fn check(&self, user: &str) -> Verdict {
        if let Some(verdict) = self.cached(user) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return verdict;
        }
        // One outbound request per user however many arrive at once: the first caller fetches, the others
        // wait on the same cell.
        let cell = self
            .in_flight
            .lock()
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let verdict = *cell
            .get_or_init(|| async {
                let verdict = self.fetch(user).await;
                self.remember(user, verdict);
                verdict
            })
            .await;
        let mut in_flight = self.in_flight.lock();
        if in_flight
            .get(user)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            in_flight.remove(user);
        }
        verdict
    }

    fn cached(&self, user: &str) -> Option<Verdict> {
        let cache = self.cache.lock();
        let (verdict, expires) = cache.get(user)?;
        (Instant::now() < *expires).then_some(*verdict)
    }

    fn remember(&self, user: &str, verdict: Verdict) {
        let ttl = match verdict {
            Verdict::FailedOpen => FAILED_OPEN_TTL.min(self.config.cache_ttl),
            _ => self.config.cache_ttl,
        };
        let now = Instant::now();
        let mut cache = self.cache.lock();
        if cache.len() >= self.config.max_cached_users && !cache.contains_key(user) {
            cache.retain(|_, (_, expires)| *expires > now);
            // Still full of live entries: drop a slice of them. Those users are simply asked again.
            if cache.len() >= self.config.max_cached_users {
                let drop_count = (self.config.max_cached_users / 10).max(1);
                let victims: Vec<String> = cache.keys().take(drop_count).cloned().collect();
                for victim in victims {
                    cache.remove(&victim);
                }
            }
        }
        cache.insert(user.to_owned(), (verdict, now + ttl));
    }

    pub fn cached_users(&self) -> usize {
        self.cache.lock().len()
    }

    async fn fetch(&self, user: &str) -> Verdict {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let url = format!(
            "{}/api/v1/internal/sync/status/{}",
            self.config.url.trim_end_matches('/'),
            encode_segment(user)
        );
        let key = self.config.service_key.clone();
        let agent = self.agent.clone();
        let answer = tokio::task::spawn_blocking(move || ask(&agent, &url, key.as_deref())).await;
        let verdict = match answer {
            Ok(Ok(true)) => Verdict::Active,
            Ok(Ok(false)) => Verdict::Inactive,
            Ok(Err(why)) => {
                crate::log::warn(
                    "billing check failed; allowing the request",
                    &[("error", why.into())],
                );
                Verdict::FailedOpen
            }
            Err(_) => Verdict::FailedOpen,
        };
        let counter = match verdict {
            Verdict::Active => &self.stats.active,
            Verdict::Inactive => &self.stats.inactive,
            Verdict::FailedOpen => &self.stats.failed_open,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        verdict
    }
}

fn ask(agent: &ureq::Agent, url: &str, key: Option<&str>) -> Result<bool, String> {
    let mut request = agent.get(url);
    if let Some(key) = key {
        request = request.header("X-Service-Key", key);
    }
    let mut response = request.call().map_err(|e| format!("request failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status().as_u16()));
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_vec()
        .map_err(|e| format!("reading: {e}"))?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|_| "answer is not JSON".to_owned())?;
    value
        .get("active")
        .and_then(Value::as_bool)
        .ok_or_else(|| "answer has no boolean \"active\"".to_owned())
}

/// Percent-encodes a path segment (user ids are opaque strings).
fn encode_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            // '.' is encoded too: a user id `.` or `..` must not become a dot-segment of the path.
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_encoded_as_one_path_segment() {
        assert_eq!(encode_segment("user-1_a~"), "user-1_a~");
        assert_eq!(encode_segment("a/b c?ü"), "a%2Fb%20c%3F%C3%BC");
        // No dot-segments: `.` and `..` would change which resource the URL names.
        assert_eq!(encode_segment("."), "%2E");
        assert_eq!(encode_segment(".."), "%2E%2E");
        assert_eq!(encode_segment("a.b"), "a%2Eb");
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bound() {
        let billing = Billing::new(BillingConfig {
            url: "http://127.0.0.1:1".into(),
            service_key: None,
            cache_ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(100),
            max_cached_users: 1000,
            tls: Default::default(),
        });
        for i in 0..100_000 {
            billing.remember(&format!("user-{i}"), Verdict::Active);
            assert!(billing.cached_users() <= 1000);
        }
        assert_eq!(billing.cached("user-99999"), Some(Verdict::Active));
    }
}
