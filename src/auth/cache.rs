//! A bounded cache of successfully verified tokens.
//!
//! A device sends the same bearer token with every request (it polls, for
//! many collections), so without this every request paid for a full
//! Ed25519 verification of a token that was already verified seconds ago.
//!
//! The cache never changes an answer, only its cost: a hit returns what a
//! fresh [`verify_token`](super::verify_token) would return at that instant.
//! That holds because
//! - only successes are stored, keyed by the exact token text (a keyed
//!   SipHash of it picks the slot; the full token is stored and compared,
//!   so a hash collision is a miss, never another token's claims);
//! - every hit re-applies the `exp`/`nbf` rule with the configured leeway
//!   through [`check_time_window`], the function `verify_token` itself uses;
//! - every entry remembers the key-set generation it was verified under
//!   and the `kid` and key bytes used. After the key set changed, a hit
//!   first checks that the `kid` still selects the same key bytes (what
//!   `verify_token` would pick); if not, the entry is dropped and the caller
//!   verifies afresh, so tokens of a rotated-out key are refused;
//! - issuer and audience rules are fixed for the life of an
//!   [`Authenticator`](super::Authenticator), which owns one cache.
//!
//! Bound and eviction: at most `capacity` entries, split over up to
//! [`SHARDS`] independently locked shards (per-shard capacities sum to
//! exactly `capacity`). Inserting into a full shard first sweeps out its
//! entries that are no longer valid in time; if that frees less than a
//! quarter of the shard, the whole shard is cleared. So eviction is
//! "expired first, otherwise clear one shard" — not LRU, but O(1)
//! amortised, and the cost of a clear is one re-verification per active
//! token of that shard (1/16 of them). Memory is dominated by the stored
//! token text: per entry the token plus a few hundred bytes (claims,
//! key, table slack).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::PUBLIC_KEY_LENGTH;
use parking_lot::RwLock;

use super::jwt::{check_time_window, Verified};
use super::Claims;

/// Number of independently locked shards (fewer if the capacity is smaller).
pub(crate) const SHARDS: usize = 16;

struct Entry {
    token: Box<str>,
    claims: Claims,
    nbf: Option<i64>,
    kid: Option<String>,
    key: [u8; PUBLIC_KEY_LENGTH],
    /// Key-set generation the entry was verified (or last re-checked) under.
    generation: u64,
}

impl Entry {
    fn in_time(&self, now: i64, leeway_secs: i64) -> bool {
        check_time_window(self.claims.exp, self.nbf, now, leeway_secs).is_ok()
    }
}

struct Shard {
    capacity: usize,
    /// Keyed by the token's hash; the entry holds the token to compare.
    map: RwLock<HashMap<u64, Entry>>,
}

/// What a lookup found, decided under the shard's read lock.
enum Found {
    Nothing,
    Invalid,
    Valid(Claims),
    /// Verified under an older key set: valid only if `kid` still selects
    /// `key`.
    Stale(Option<String>, [u8; PUBLIC_KEY_LENGTH], Claims),
}

pub(crate) struct VerifiedCache {
    shards: Box<[Shard]>,
    /// SipHash keys drawn at random, so slots cannot be predicted.
    hasher: RandomState,
    leeway_secs: i64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl VerifiedCache {
    /// A cache of at most `capacity` entries (0 disables it) whose time
    /// checks use `leeway_secs`, which must be the verifier's leeway.
    pub(crate) fn new(capacity: usize, leeway_secs: i64) -> Self {
        Self::with_shards(capacity, SHARDS, leeway_secs)
    }

    fn with_shards(capacity: usize, shards: usize, leeway_secs: i64) -> Self {
        let n = capacity.min(shards.max(1));
        let shards = (0..n)
            .map(|i| Shard {
                capacity: capacity / n + usize::from(i < capacity % n),
                map: RwLock::new(HashMap::new()),
            })
            .collect();
        VerifiedCache {
            shards,
            hasher: RandomState::new(),
            leeway_secs,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn locate(&self, token: &str) -> Option<(u64, &Shard)> {
        if self.shards.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(token);
        // The map re-hashes the key, so reusing these bits is harmless.
        let shard = &self.shards[(hash >> 32) as usize % self.shards.len()];
        Some((hash, shard))
    }

    /// The claims of `token` if it was verified before and that answer
    /// still holds at `now` under key-set `generation`.
    ///
    /// `same_key(kid, key)` is asked only for an entry from an older
    /// generation and must say whether the current key set still selects
    /// exactly `key` for `kid`. It is called without any shard lock held.
    pub(crate) fn get(
        &self,
        token: &str,
        now: i64,
        generation: u64,
        same_key: impl FnOnce(Option<&str>, &[u8; PUBLIC_KEY_LENGTH]) -> bool,
    ) -> Option<Claims> {
        let (hash, shard) = self.locate(token)?;
        let found = match shard.map.read().get(&hash) {
            Some(e) if *e.token == *token => {
                if !e.in_time(now, self.leeway_secs) {
                    Found::Invalid
                } else if e.generation == generation {
                    Found::Valid(e.claims.clone())
                } else {
                    Found::Stale(e.kid.clone(), e.key, e.claims.clone())
                }
            }
            _ => Found::Nothing,
        };
        let claims = match found {
            Found::Nothing => None,
            Found::Valid(claims) => Some(claims),
            Found::Invalid => {
                shard.remove(hash, token);
                None
            }
            Found::Stale(kid, key, claims) => {
                if same_key(kid.as_deref(), &key) {
                    let mut map = shard.map.write();
                    if let Some(e) = map.get_mut(&hash).filter(|e| *e.token == *token) {
                        e.generation = e.generation.max(generation);
                    }
                    Some(claims)
                } else {
                    shard.remove(hash, token);
                    None
                }
            }
        };
        let counter = if claims.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        claims
    }

    /// Remembers a successful verification of `token` made at `now` with
    /// the key set of `generation`.
    pub(crate) fn insert(&self, token: &str, verified: &Verified, generation: u64, now: i64) {
        let Some((hash, shard)) = self.locate(token) else {
            return;
        };
        let entry = Entry {
            token: token.into(),
            claims: verified.claims.clone(),
            nbf: verified.nbf,
            kid: verified.kid.clone(),
            key: verified.key,
            generation,
        };
        let mut map = shard.map.write();
        if map.len() >= shard.capacity && !map.contains_key(&hash) {
            map.retain(|_, e| e.in_time(now, self.leeway_secs));
            // Freed less than a quarter: clear, so the sweep stays amortised O(1).
            if map.len() * 4 > shard.capacity * 3 {
                map.clear();
            }
        }
        map.insert(hash, entry);
    }

    /// `(hits, misses)` of [`get`](Self::get) since creation; a disabled
    /// cache counts neither.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Entries currently held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.map.read().len()).sum()
    }
}

impl Shard {
    fn remove(&self, hash: u64, token: &str) {
        let mut map = self.map.write();
        if map.get(&hash).is_some_and(|e| *e.token == *token) {
            map.remove(&hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::devkeys::sign_raw;
    use crate::auth::jwt::{verify_token, verify_token_detailed, KeySet, Rules};
    use crate::auth::AuthError;
    use ed25519_dalek::SigningKey;

    const NOW: i64 = 1_700_000_000;

    fn rules(leeway_secs: i64) -> Rules<'static> {
        Rules {
            issuer: None,
            audience: Some("mana"),
            leeway_secs,
        }
    }

    fn keys() -> KeySet {
        let mut keys = KeySet::new();
        keys.insert("k1", SigningKey::from_bytes(&[1; 32]).verifying_key());
        keys
    }

    fn token(claims: &str) -> String {
        sign_raw(
            r#"{"alg":"EdDSA","kid":"k1"}"#,
            claims,
            &SigningKey::from_bytes(&[1; 32]),
        )
    }

    /// At every instant around the window, for several leeways, a lookup
    /// succeeds exactly when a fresh verification does.
    #[test]
    fn hits_agree_with_fresh_verification_at_every_instant() {
        let (exp, nbf) = (NOW + 20, NOW + 10);
        let with_nbf = token(&format!(
            r#"{{"sub":"u","aud":"mana","exp":{exp},"nbf":{nbf}}}"#
        ));
        let without = token(&format!(r#"{{"sub":"u","aud":"mana","exp":{exp}}}"#));
        let keys = keys();
        for leeway in [-5, 0, 1, 30] {
            for t in [&with_nbf, &without] {
                let verified = verify_token_detailed(t, &keys, NOW + 15, &rules(leeway)).unwrap();
                for now in NOW - 40..NOW + 60 {
                    let cache = VerifiedCache::new(8, leeway);
                    cache.insert(t, &verified, 0, NOW + 15);
                    let fresh = verify_token(t, &keys, now, &rules(leeway));
                    let cached = cache.get(t, now, 0, |_, _| unreachable!());
                    assert_eq!(cached.ok_or(()), fresh.clone().map_err(drop), "{now}");
                    if let Err(e) = fresh {
                        let expected = if now > exp + leeway.max(0) {
                            AuthError::Expired
                        } else {
                            AuthError::NotYetValid
                        };
                        assert_eq!(e, expected);
                        // An answer that no longer holds is dropped.
                        assert_eq!(cache.len(), 0);
                    }
                }
            }
        }
    }

    #[test]
    fn hash_slot_is_not_enough_for_a_hit() {
        let cache = VerifiedCache::new(4, 0);
        let t = token(&format!(r#"{{"sub":"u","aud":"mana","exp":{}}}"#, NOW + 60));
        let verified = verify_token_detailed(&t, &keys(), NOW, &rules(0)).unwrap();
        cache.insert(&t, &verified, 0, NOW);
        // Plant the entry under another token's hash: a lookup of that
        // token finds the slot but must not accept a different token.
        let other = format!("{t}x");
        let (hash, shard) = cache.locate(&t).unwrap();
        let (other_hash, other_shard) = cache.locate(&other).unwrap();
        let entry = shard.map.write().remove(&hash).unwrap();
        other_shard.map.write().insert(other_hash, entry);
        assert_eq!(cache.get(&other, NOW, 0, |_, _| true), None);
        assert_eq!(cache.stats(), (0, 1));
    }

    #[test]
    fn capacity_is_split_exactly() {
        for capacity in [0, 1, 5, 15, 16, 17, 100, 100_000] {
            let cache = VerifiedCache::new(capacity, 0);
            let total: usize = cache.shards.iter().map(|s| s.capacity).sum();
            assert_eq!(total, capacity);
            assert!(cache.shards.iter().all(|s| s.capacity > 0));
        }
    }

    #[test]
    fn full_shard_sweeps_expired_entries_before_clearing() {
        // One shard of capacity 4, three entries about to expire.
        let cache = VerifiedCache::with_shards(4, 1, 0);
        assert_eq!(cache.shards.len(), 1);
        let keys = keys();
        let mint = |sub: &str, exp: i64| {
            let t = token(&format!(r#"{{"sub":"{sub}","aud":"mana","exp":{exp}}}"#));
            let v = verify_token_detailed(&t, &keys, NOW, &rules(0)).unwrap();
            (t, v)
        };
        let long = mint("long", NOW + 100);
        cache.insert(&long.0, &long.1, 0, NOW);
        for i in 0..3 {
            let short = mint(&format!("short{i}"), NOW + 1);
            cache.insert(&short.0, &short.1, 0, NOW);
        }
        assert_eq!(cache.len(), 4);
        // Full; at NOW + 2 the three short ones are expired and swept, the
        // long one survives.
        let new = mint("new", NOW + 100);
        cache.insert(&new.0, &new.1, 0, NOW + 2);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&long.0, NOW + 2, 0, |_, _| true).is_some());
        // Full of valid entries: the shard is cleared for the newcomer.
        for i in 0..2 {
            let more = mint(&format!("more{i}"), NOW + 100);
            cache.insert(&more.0, &more.1, 0, NOW + 2);
        }
        assert_eq!(cache.len(), 4);
        let last = mint("last", NOW + 100);
        cache.insert(&last.0, &last.1, 0, NOW + 2);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&last.0, NOW + 2, 0, |_, _| true).is_some());
    }

    #[test]
    fn disabled_cache_holds_and_counts_nothing() {
        let cache = VerifiedCache::new(0, 0);
        let t = token(&format!(r#"{{"sub":"u","aud":"mana","exp":{}}}"#, NOW + 60));
        let verified = verify_token_detailed(&t, &keys(), NOW, &rules(0)).unwrap();
        cache.insert(&t, &verified, 0, NOW);
        assert_eq!(cache.get(&t, NOW, 0, |_, _| true), None);
        assert_eq!((cache.len(), cache.stats()), (0, (0, 0)));
    }
}
