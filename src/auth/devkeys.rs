//! Development signing keys and token minting for the CLI
//! (`mana-sync keygen`, `mana-sync token`) and for tests.
//!
//! Production tokens come from Better Auth; this exists so that a developer
//! can run the server without an identity provider and so tests can mint
//! tokens (including deliberately broken ones via [`sign_raw`]). The key
//! material is drawn from `/dev/urandom` directly to avoid a dependency on a
//! rand crate just for 32 bytes.

use std::fs::OpenOptions;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::{json, Value};

pub const SIGNING_KEY_FILE: &str = "dev-signing-key.json";
pub(crate) const JWKS_FILE: &str = "dev-jwks.json";

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A fresh Ed25519 key from the OS CSPRNG.
pub(crate) fn generate_signing_key() -> io::Result<SigningKey> {
    Ok(SigningKey::from_bytes(&random_bytes::<32>()?))
}

fn random_kid() -> io::Result<String> {
    Ok(random_bytes::<8>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn public_jwk(kid: &str, key: &SigningKey) -> Value {
    json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
        "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
    })
}

/// Writes a new private key and the matching public JWKS into `dir`.
///
/// Refuses with `AlreadyExists` if the private key file is present: a
/// silently replaced key would invalidate every token already minted and
/// every JWKS already deployed.
pub fn write_dev_keys(dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join(SIGNING_KEY_FILE);
    let jwks_path = dir.join(JWKS_FILE);

    let key = generate_signing_key()?;
    let kid = random_kid()?;
    let mut private = public_jwk(&kid, &key);
    private["d"] = Value::String(URL_SAFE_NO_PAD.encode(key.to_bytes()));

    let mut opts = OpenOptions::new();
    // create_new makes the existence check and the creation one atomic step.
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Set at creation so the secret is never readable by others, even
        // briefly.
        opts.mode(0o600);
    }
    let mut file = opts.open(&key_path)?;
    file.write_all(to_pretty(&private)?.as_bytes())?;
    file.sync_all()?;

    let jwks = json!({ "keys": [public_jwk(&kid, &key)] });
    std::fs::write(&jwks_path, to_pretty(&jwks)?)?;
    Ok((key_path, jwks_path))
}

fn to_pretty(v: &Value) -> io::Result<String> {
    let mut s = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    s.push('\n');
    Ok(s)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Loads a private OKP JWK as written by [`write_dev_keys`].
pub fn load_signing_key(path: &Path) -> io::Result<(String, SigningKey)> {
    let text = std::fs::read(path)?;
    let jwk: Value = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("{}: not valid JSON: {e}", path.display())))?;
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
        return Err(invalid(format!(
            "{}: not an OKP/Ed25519 key",
            path.display()
        )));
    }
    let kid = field("kid")
        .ok_or_else(|| invalid(format!("{}: missing kid", path.display())))?
        .to_string();
    let d = field("d").ok_or_else(|| {
        invalid(format!(
            "{}: missing private component d (is this the public JWKS?)",
            path.display()
        ))
    })?;
    let d: [u8; 32] = URL_SAFE_NO_PAD
        .decode(d)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| invalid(format!("{}: d is not 32 base64url bytes", path.display())))?;
    let key = SigningKey::from_bytes(&d);
    // Catch a hand-edited file whose public half no longer matches, which
    // would otherwise surface later as confusing bad_signature errors.
    if let Some(x) = field("x") {
        if x != URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()) {
            return Err(invalid(format!("{}: x does not match d", path.display())));
        }
    }
    Ok((kid, key))
}

/// Signs arbitrary header and claims JSON as a compact JWS.
///
/// No validation at all, so tests can forge `alg: none`, `HS256`, missing
/// claims and so on, with a real Ed25519 signature on top.
pub fn sign_raw(header_json: &str, claims_json: &str, key: &SigningKey) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(claims_json)
    );
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// Mints a token shaped like Better Auth's: `sub`, `iat`, `exp`, and `iss`
/// / `aud` when given.
pub fn mint_token(
    kid: &str,
    key: &SigningKey,
    sub: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
    now_unix: i64,
) -> String {
    let header = json!({ "alg": "EdDSA", "kid": kid, "typ": "JWT" });
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let mut claims = json!({
        "sub": sub,
        "iat": now_unix,
        "exp": now_unix.saturating_add(ttl_secs),
    });
    if let Some(iss) = issuer {
        claims["iss"] = Value::String(iss.to_string());
    }
    if let Some(aud) = audience {
        claims["aud"] = Value::String(aud.to_string());
    }
    sign_raw(&header.to_string(), &claims.to_string(), key)
}

/// Parses a token lifetime: plain seconds (`"900"`) or a number with an
/// `s`, `m`, `h` or `d` suffix (`"30s"`, `"15m"`, `"2h"`, `"7d"`).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let mult: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => {
            return Err(format!(
                "invalid ttl {s:?}: unknown unit {unit:?} (use s, m, h or d)"
            ))
        }
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid ttl {s:?}: expected a whole number optionally followed by s, m, h or d"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid ttl {s:?}: number too large"))?;
    if n == 0 {
        return Err(format!("invalid ttl {s:?}: must be positive"));
    }
    let secs = n
        .checked_mul(mult)
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or_else(|| format!("invalid ttl {s:?}: too large"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::{verify_token, Rules};
    use crate::auth::{AuthConfig, Authenticator};

    /// A unique, self-deleting directory; no tempfile crate available.
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let n = u64::from_le_bytes(random_bytes::<8>().unwrap());
            let p = std::env::temp_dir().join(format!("mana-auth-{tag}-{n:016x}"));
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("900"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl(" 5M "), Ok(Duration::from_secs(300)));
        for bad in [
            "",
            "m",
            "0",
            "0s",
            "-5m",
            "1.5h",
            "10x",
            "1 h",
            "abc",
            "99999999999999999999",
            "9999999999999999d",
            "+5",
            "é",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn generated_keys_differ() {
        let a = generate_signing_key().unwrap();
        let b = generate_signing_key().unwrap();
        assert_ne!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn write_load_mint_verify_round_trip() {
        let tmp = TempDir::new("devkeys");
        let dir = tmp.0.join("nested");
        let (key_path, jwks_path) = write_dev_keys(&dir).unwrap();
        assert_eq!(key_path, dir.join(SIGNING_KEY_FILE));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The public file must not leak the private scalar.
        let public = std::fs::read_to_string(&jwks_path).unwrap();
        assert!(!public.contains("\"d\""));

        // Never overwrite an existing key.
        let before = std::fs::read(&key_path).unwrap();
        let err = write_dev_keys(&dir).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&key_path).unwrap(), before);

        let (kid, key) = load_signing_key(&key_path).unwrap();
        assert_eq!(kid.len(), 16);
        assert!(kid.bytes().all(|b| b.is_ascii_hexdigit()));

        let now = 1_700_000_000;
        let token = mint_token(
            &kid,
            &key,
            "user-42",
            Duration::from_secs(900),
            Some("iss-x"),
            Some("mana"),
            now,
        );
        let keys = crate::auth::jwks::read_jwks_file(&jwks_path).unwrap();
        let rules = Rules {
            issuer: Some("iss-x"),
            audience: Some("mana"),
            leeway_secs: 0,
        };
        let claims = verify_token(&token, &keys, now, &rules).unwrap();
        assert_eq!(claims.sub, "user-42");
        assert_eq!(claims.exp, now + 900);

        // Same through the Authenticator, fed only by the JWKS file.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let auth = Authenticator::new(AuthConfig {
                jwks_file: Some(jwks_path.clone()),
                issuer: Some("iss-x".into()),
                audience: Some("mana".into()),
                ..AuthConfig::default()
            });
            let real_now = crate::clock::unix_now();
            let token = mint_token(
                &kid,
                &key,
                "user-42",
                Duration::from_secs(60),
                Some("iss-x"),
                Some("mana"),
                real_now,
            );
            // No explicit refresh: the first kid miss loads the file.
            let claims = auth.verify(&token).await.unwrap();
            assert_eq!(claims.sub, "user-42");
            assert_eq!(auth.key_count(), 1);
            assert_eq!(auth.refresh_stats(), (1, 0));
        });
    }

    #[test]
    fn load_rejects_bad_files() {
        let tmp = TempDir::new("badkeys");
        std::fs::create_dir_all(&tmp.0).unwrap();
        let (_, jwks) = write_dev_keys(&tmp.0).unwrap();
        // The public JWKS is not a private key.
        assert_eq!(
            load_signing_key(&jwks).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let p = tmp.0.join("mismatch.json");
        let d = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let x = URL_SAFE_NO_PAD.encode(
            SigningKey::from_bytes(&[2u8; 32])
                .verifying_key()
                .as_bytes(),
        );
        std::fs::write(
            &p,
            format!(r#"{{"kty":"OKP","crv":"Ed25519","kid":"k","d":"{d}","x":"{x}"}}"#),
        )
        .unwrap();
        assert!(load_signing_key(&p).is_err());
        assert_eq!(
            load_signing_key(&tmp.0.join("absent.json"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn sign_raw_shape() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let t = sign_raw(r#"{"alg":"none"}"#, "{}", &key);
        assert_eq!(t.split('.').count(), 3);
        assert!(!t.contains('='));
    }
}
