//! JWKS documents: parsing them into a [`KeySet`] and fetching them.
//!
//! Parsing is pure and tolerant per key: Better Auth (or an operator) may
//! publish keys we cannot use, such as RSA keys during a migration, and one
//! such key must not take every user offline. A document that yields no
//! usable key at all is an error, so a broken endpoint is noticed instead
//! of silently emptying the key cache.
//!
//! The fetch helpers are blocking on purpose (ureq, std::fs); the
//! [`Authenticator`](super::Authenticator) runs them on tokio's blocking
//! pool so the async workers never stall on a slow identity server.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use super::jwt::KeySet;

/// Real documents hold a handful of keys; anything bigger is a misconfigured
/// or hostile endpoint and is refused before it can use much memory.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// Bound on stored keys, for the same reason.
pub const MAX_KEYS: usize = 64;

/// Parses a JWKS document, keeping the Ed25519 signing keys.
///
/// Keys with another `kty`/`crv`, an `alg` other than EdDSA, a `use` other
/// than `sig`, or an undecodable `x` are skipped; the error message lists
/// why when nothing usable is left.
pub fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not valid JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" array")?;
    let mut set = KeySet::new();
    let mut skipped = Vec::new();
    for (i, jwk) in keys.iter().enumerate() {
        if set.len() >= MAX_KEYS {
            skipped.push(format!("key {i}: more than {MAX_KEYS} keys"));
            break;
        }
        match parse_jwk(jwk) {
            Ok((kid, key)) => {
                // First occurrence wins: a later duplicate cannot shadow a
                // key that appeared earlier in the same document.
                if !set.contains(&kid) {
                    set.insert(kid, key);
                }
            }
            Err(why) => skipped.push(format!("key {i}: {why}")),
        }
    }
    if set.is_empty() {
        let detail = if skipped.is_empty() {
            "the keys array is empty".to_string()
        } else {
            skipped.join("; ")
        };
        return Err(format!("JWKS has no usable Ed25519 key ({detail})"));
    }
    Ok(set)
}

fn parse_jwk(jwk: &Value) -> Result<(String, VerifyingKey), String> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if !jwk.is_object() {
        return Err("not a JSON object".into());
    }
    if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
        return Err("not an OKP/Ed25519 key".into());
    }
    if let Some(alg) = jwk.get("alg") {
        if alg.as_str() != Some("EdDSA") {
            return Err("alg is not EdDSA".into());
        }
    }
    if let Some(use_) = jwk.get("use") {
        if use_.as_str() != Some("sig") {
            return Err("use is not sig".into());
        }
    }
    let x = field("x").ok_or("missing x")?;
    let raw = URL_SAFE_NO_PAD
        .decode(x)
        .map_err(|_| "x is not base64url".to_string())?;
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| format!("x is {} bytes, expected 32", raw.len()))?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| "x is not a valid point".to_string())?;
    // A small-order key would let trivial signatures verify under lax
    // checking; verify_strict refuses them anyway, so reject them early.
    if key.is_weak() {
        return Err("x is a weak (small-order) key".into());
    }
    let kid = match jwk.get("kid") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("kid is not a string".into()),
    };
    Ok((kid, key))
}

/// Fetches and parses a JWKS over HTTP or HTTPS (verified against `tls`'s roots). Blocking.
pub fn fetch_jwks_url(
    url: &str,
    timeout: Duration,
    tls: &crate::client_tls::OutboundTls,
) -> Result<KeySet, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .tls_config(tls.ureq())
        // Status is checked below so that the error names the status code
        // instead of a generic transport failure.
        .http_status_as_error(false)
        // The key set comes from the configured URL only: a redirect (to another host, say) is an error.
        .max_redirects(0)
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| format!("fetching JWKS from {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!(
            "fetching JWKS from {url}: HTTP {}",
            status.as_u16()
        ));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_vec()
        .map_err(|e| format!("reading JWKS body from {url}: {e}"))?;
    parse_jwks(&body).map_err(|e| format!("{url}: {e}"))
}

/// Reads and parses a JWKS file. Blocking.
pub fn read_jwks_file(path: &Path) -> Result<KeySet, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut body = Vec::new();
    file.take(MAX_JWKS_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if body.len() as u64 > MAX_JWKS_BYTES {
        return Err(format!(
            "{} is larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    parse_jwks(&body).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn x_of(seed: u8) -> String {
        URL_SAFE_NO_PAD.encode(
            SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .as_bytes(),
        )
    }

    /// Answers one HTTP request on `listener` with `response`; counts requests in `hits`.
    fn serve_once(
        listener: std::net::TcpListener,
        response: String,
        hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::io::{Read, Write};
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(response.as_bytes());
            }
        });
    }

    #[test]
    fn a_redirect_is_not_followed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let elsewhere_addr = elsewhere.local_addr().unwrap();
        let body = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"k"}}]}}"#,
            x_of(1)
        );
        let elsewhere_hits = Arc::new(AtomicUsize::new(0));
        serve_once(
            elsewhere,
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
            elsewhere_hits.clone(),
        );
        let configured = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks", configured.local_addr().unwrap());
        serve_once(
            configured,
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://{elsewhere_addr}/jwks\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            Arc::new(AtomicUsize::new(0)),
        );
        let error = fetch_jwks_url(&url, Duration::from_secs(5), &Default::default())
            .expect_err("a redirect is an error");
        assert!(error.contains("302"), "{error}");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            elsewhere_hits.load(Ordering::SeqCst),
            0,
            "the redirect was not followed"
        );
    }

    #[test]
    fn valid_document() {
        let doc = format!(
            r#"{{"keys":[
                {{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"a","alg":"EdDSA","use":"sig"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"b"}}
            ]}}"#,
            x_of(1),
            x_of(2)
        );
        let ks = parse_jwks(doc.as_bytes()).unwrap();
        assert_eq!(ks.len(), 2);
        assert_eq!(
            ks.get("a"),
            Some(&SigningKey::from_bytes(&[1; 32]).verifying_key())
        );
    }

    #[test]
    fn skips_unusable_keys() {
        let doc = format!(
            r#"{{"keys":[
                {{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"rsa"}},
                {{"kty":"EC","crv":"P-256","x":"AA","y":"AA","kid":"ec"}},
                {{"kty":"OKP","crv":"X25519","x":"{x}","kid":"xdh"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"enc","use":"enc"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"rs","alg":"RS256"}},
                {{"kty":"OKP","crv":"Ed25519","x":"AAAA","kid":"short"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{x}=","kid":"padded"}},
                {{"kty":"OKP","crv":"Ed25519","kid":"nox"}},
                "not an object",
                {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"good"}}
            ]}}"#,
            x = x_of(3)
        );
        let ks = parse_jwks(doc.as_bytes()).unwrap();
        assert_eq!(ks.kids().collect::<Vec<_>>(), vec!["good"]);
    }

    #[test]
    fn wrong_x_length_only_key_is_error() {
        let long = URL_SAFE_NO_PAD.encode([7u8; 33]);
        let doc = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{long}","kid":"k"}}]}}"#);
        let err = parse_jwks(doc.as_bytes()).unwrap_err();
        assert!(err.contains("33 bytes"), "{err}");
    }

    #[test]
    fn weak_key_rejected() {
        // The identity point encodes as 1 followed by zeros.
        let mut id = [0u8; 32];
        id[0] = 1;
        let doc = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"k"}}]}}"#,
            URL_SAFE_NO_PAD.encode(id)
        );
        assert!(parse_jwks(doc.as_bytes()).is_err());
    }

    #[test]
    fn not_json_or_empty() {
        assert!(parse_jwks(b"<html>")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_jwks(b"").is_err());
        assert!(parse_jwks(br#"{"keys":[]}"#).unwrap_err().contains("empty"));
        assert!(parse_jwks(br#"{}"#).is_err());
        assert!(parse_jwks(br#"{"keys":{}}"#).is_err());
        assert!(parse_jwks(br#"[]"#).is_err());
    }

    #[test]
    fn duplicate_kid_first_wins_and_missing_kid() {
        let doc = format!(
            r#"{{"keys":[
                {{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"k"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"k"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{}"}}
            ]}}"#,
            x_of(1),
            x_of(2),
            x_of(3)
        );
        let ks = parse_jwks(doc.as_bytes()).unwrap();
        assert_eq!(ks.len(), 2);
        assert_eq!(
            ks.get("k"),
            Some(&SigningKey::from_bytes(&[1; 32]).verifying_key())
        );
        assert!(ks.contains(""));
    }

    #[test]
    fn missing_file_is_error() {
        let err = read_jwks_file(Path::new("/nonexistent/dir/jwks.json")).unwrap_err();
        assert!(err.contains("/nonexistent/dir/jwks.json"));
    }
}
