//! The verified-token cache: hits, expiry, key rotation, its bound and concurrent refreshes.

use super::*;

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
