//! Compact-JWS parsing and verification for Better Auth's EdDSA tokens.
//!
//! This file owns everything that turns untrusted token text into trusted
//! [`Claims`]: segment splitting, strict base64url decoding, the `alg`
//! allow-list, signature verification and the claim checks. It is pure (no
//! I/O, no clock, no globals) so that it can be fuzzed and unit-tested with
//! fixed times; the caller supplies the key set and "now".
//!
//! Ordering matters for security: the header is only used to pick a key and
//! reject unsupported algorithms, and the payload is not even decoded until
//! the signature over it has been verified.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::Value;

use super::{AuthError, Claims};

/// Upper bound on the whole token. Real Better Auth tokens are well under
/// 1 KB; the cap keeps hostile input from costing decode/parse time.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Attacker-controlled strings (the `alg` value) end up in error messages
/// and logs, so they are truncated to this many characters.
const MAX_ECHOED_LEN: usize = 32;

/// The only algorithm accepted. Compared byte-for-byte: "eddsa" or
/// "EdDSA " are not the same algorithm name per RFC 7515.
pub const ALG_EDDSA: &str = "EdDSA";

/// Verification keys indexed by `kid`.
///
/// A JWK without a `kid` is stored under the empty string, which is also
/// what a token without a `kid` falls back to when the set has one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
}

impl KeySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the key for `kid`.
    pub fn insert(&mut self, kid: impl Into<String>, key: VerifyingKey) {
        self.keys.insert(kid.into(), key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Union of both sets; on a `kid` collision `other` wins because it is
    /// the fresher source in every call site.
    pub fn merge(&mut self, other: KeySet) {
        self.keys.extend(other.keys);
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The single key of a one-key set, used for tokens without `kid`.
    fn only_key(&self) -> Option<&VerifyingKey> {
        if self.keys.len() == 1 {
            self.keys.values().next()
        } else {
            None
        }
    }

    /// The key [`verify_token`] checks a token with `kid` against: the
    /// key under that `kid`, or for a token without one the only key of a
    /// one-key set. `None` is what `verify_token` reports as `UnknownKey`.
    pub fn select(&self, kid: Option<&str>) -> Option<&VerifyingKey> {
        match kid {
            Some(kid) => self.get(kid),
            None => self.only_key(),
        }
    }
}

/// Which checks beyond the signature and `exp`/`nbf`/`sub` to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules<'a> {
    /// Required `iss` value; `None` means the issuer is not checked.
    pub issuer: Option<&'a str>,
    /// Audience that must appear in `aud`; `None` means not checked.
    pub audience: Option<&'a str>,
    /// Clock-skew tolerance for `exp` and `nbf`, in seconds. Negative
    /// values are treated as zero.
    pub leeway_secs: i64,
}

/// The parts of the JOSE header we use. Only trusted enough to select a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Sanitised and truncated, because it may be echoed in errors.
    pub alg: String,
    /// `None` when absent, non-string or empty.
    pub kid: Option<String>,
    pub typ: Option<String>,
}

/// The three still-encoded segments of a structurally valid token.
struct Segments<'t> {
    header: &'t str,
    payload: &'t str,
    signature: &'t str,
    /// `header "." payload`, the exact bytes the signature covers.
    signing_input: &'t str,
}

fn split(token: &str) -> Result<Segments<'_>, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed(format!(
            "token is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    if token.is_empty() {
        return Err(AuthError::Malformed("token is empty".into()));
    }
    // Checking the alphabet up front gives one clear error for padding,
    // whitespace and the standard (non-URL) alphabet alike.
    if let Some(bad) = token
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
    {
        let what = if bad == b'=' {
            "base64 padding is not allowed".to_string()
        } else {
            format!("invalid character 0x{bad:02x} (expected base64url)")
        };
        return Err(AuthError::Malformed(what));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        let n = token.split('.').count();
        return Err(AuthError::Malformed(format!(
            "expected 3 dot-separated segments, found {n}"
        )));
    };
    // header and payload are ASCII, so this index is a char boundary.
    let signing_input = &token[..header.len() + 1 + payload.len()];
    Ok(Segments {
        header,
        payload,
        signature,
        signing_input,
    })
}

fn b64(segment: &str, what: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| AuthError::Malformed(format!("{what} is not valid base64url")))
}

fn json_object(bytes: &[u8], what: &str) -> Result<serde_json::Map<String, Value>, AuthError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(AuthError::Malformed(format!("{what} is not a JSON object"))),
        Err(_) => Err(AuthError::Malformed(format!("{what} is not valid JSON"))),
    }
}

/// Keeps attacker text printable and short before it reaches a log line.
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_ECHOED_LEN)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if s.chars().count() > MAX_ECHOED_LEN {
        out.push('…');
    }
    out
}

fn parse_header(segment: &str) -> Result<Header, AuthError> {
    let map = json_object(&b64(segment, "header")?, "header")?;
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood, and we understand none.
    if map.contains_key("crit") {
        return Err(AuthError::Malformed(
            "header crit names extensions this server does not support".into(),
        ));
    }
    let alg = match map.get("alg") {
        Some(Value::String(s)) => sanitize(s),
        Some(_) => return Err(AuthError::Malformed("header alg is not a string".into())),
        None => return Err(AuthError::Malformed("header has no alg".into())),
    };
    let kid = match map.get("kid") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let typ = match map.get("typ") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Header { alg, kid, typ })
}

/// Decodes the header without verifying anything. Useful to find the `kid`
/// of a token; never base a trust decision on the result alone.
pub fn decode_header(token: &str) -> Result<Header, AuthError> {
    parse_header(split(token)?.header)
}

/// JWT NumericDate: integer or fractional seconds. Fractions are floored
/// and out-of-range values saturate, which only matters for absurd dates.
fn numeric_date(v: &Value) -> Option<i64> {
    let n = v.as_number()?;
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    if f.is_finite() {
        // `as` saturates for floats, so this cannot wrap or panic.
        Some(f.floor() as i64)
    } else {
        None
    }
}

fn optional_string(map: &serde_json::Map<String, Value>, name: &str) -> Option<String> {
    match map.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Verifies `token` against `keys` and returns its claims.
///
/// A token without `kid` is accepted only when `keys` holds exactly one
/// key; with several keys guessing would just be a signature oracle, so it
/// is `UnknownKey`.
pub fn verify_token(
    token: &str,
    keys: &KeySet,
    now_unix: i64,
    rules: &Rules,
) -> Result<Claims, AuthError> {
    verify_token_detailed(token, keys, now_unix, rules).map(|v| v.claims)
}

/// A successful [`verify_token_detailed`]: the claims plus what a caller
/// needs to tell later, without redoing the signature check, whether a
/// fresh verification of the same token would still succeed — the time
/// window (re-check with [`check_time_window`]) and the key that was used
/// (re-check with [`KeySet::select`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub claims: Claims,
    /// The token's `nbf`, if it has one (`exp` is in `claims`).
    pub nbf: Option<i64>,
    /// The `kid` the key was selected by; `None` for a token without one.
    pub kid: Option<String>,
    /// The public key the signature was verified with.
    pub key: [u8; ed25519_dalek::PUBLIC_KEY_LENGTH],
}

/// [`verify_token`], also reporting the `nbf`, `kid` and key it used.
pub fn verify_token_detailed(
    token: &str,
    keys: &KeySet,
    now_unix: i64,
    rules: &Rules,
) -> Result<Verified, AuthError> {
    let seg = split(token)?;
    let header = parse_header(seg.header)?;
    if header.alg != ALG_EDDSA {
        return Err(AuthError::UnsupportedAlgorithm(header.alg));
    }
    let key = keys
        .select(header.kid.as_deref())
        .ok_or(AuthError::UnknownKey)?;

    let sig_bytes = b64(seg.signature, "signature")?;
    let sig_array: [u8; Signature::BYTE_SIZE] = sig_bytes
        .as_slice()
        .try_into()
        .map_err(|_| AuthError::Malformed("signature is not 64 bytes".into()))?;
    let signature = Signature::from_bytes(&sig_array);
    // verify_strict rejects malleable signatures and small-order keys, so a
    // valid token has exactly one accepted encoding.
    key.verify_strict(seg.signing_input.as_bytes(), &signature)
        .map_err(|_| AuthError::BadSignature)?;

    // Only from here on is the payload trusted.
    let claims = json_object(&b64(seg.payload, "payload")?, "payload")?;
    let (claims, nbf) = check_claims(&claims, now_unix, rules)?;
    Ok(Verified {
        claims,
        nbf,
        kid: header.kid,
        key: key.to_bytes(),
    })
}

/// The `exp`/`nbf` rule of [`verify_token`] on its own, for a token whose
/// signature and other claims were already accepted: `Expired` once
/// `now > exp + leeway`, then `NotYetValid` while `now + leeway < nbf`
/// (same order, same saturating arithmetic, negative leeway as zero).
pub fn check_time_window(
    exp: i64,
    nbf: Option<i64>,
    now_unix: i64,
    leeway_secs: i64,
) -> Result<(), AuthError> {
    let leeway = leeway_secs.max(0);
    check_exp(exp, now_unix, leeway)?;
    match nbf {
        Some(nbf) => check_nbf(nbf, now_unix, leeway),
        None => Ok(()),
    }
}

fn check_exp(exp: i64, now: i64, leeway: i64) -> Result<(), AuthError> {
    if now > exp.saturating_add(leeway) {
        return Err(AuthError::Expired);
    }
    Ok(())
}

fn check_nbf(nbf: i64, now: i64, leeway: i64) -> Result<(), AuthError> {
    if now.saturating_add(leeway) < nbf {
        return Err(AuthError::NotYetValid);
    }
    Ok(())
}

/// The claims and the `nbf` they were checked with.
fn check_claims(
    map: &serde_json::Map<String, Value>,
    now: i64,
    rules: &Rules,
) -> Result<(Claims, Option<i64>), AuthError> {
    let leeway = rules.leeway_secs.max(0);

    let exp = map
        .get("exp")
        .and_then(numeric_date)
        .ok_or_else(|| AuthError::Malformed("exp claim is missing or not a number".into()))?;
    check_exp(exp, now, leeway)?;
    let nbf = match map.get("nbf") {
        Some(v) => {
            let nbf = numeric_date(v)
                .ok_or_else(|| AuthError::Malformed("nbf claim is not a number".into()))?;
            check_nbf(nbf, now, leeway)?;
            Some(nbf)
        }
        None => None,
    };

    let sub = match map.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(AuthError::MissingSubject),
    };

    if let Some(want) = rules.issuer {
        match map.get("iss") {
            Some(Value::String(got)) if got == want => {}
            _ => return Err(AuthError::WrongIssuer),
        }
    }

    if let Some(want) = rules.audience {
        let ok = match map.get("aud") {
            Some(Value::String(got)) => got == want,
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(want)),
            _ => false,
        };
        if !ok {
            return Err(AuthError::WrongAudience);
        }
    }

    let claims = Claims {
        sub,
        exp,
        email: optional_string(map, "email"),
        role: optional_string(map, "role"),
        sid: optional_string(map, "sid"),
    };
    Ok((claims, nbf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::devkeys::sign_raw;
    use ed25519_dalek::SigningKey;

    const NOW: i64 = 1_700_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn keyset(kid: &str, k: &SigningKey) -> KeySet {
        let mut ks = KeySet::new();
        ks.insert(kid, k.verifying_key());
        ks
    }

    fn rules() -> Rules<'static> {
        Rules {
            issuer: Some("https://auth.example"),
            audience: Some("mana"),
            leeway_secs: 30,
        }
    }

    const HDR: &str = r#"{"alg":"EdDSA","kid":"k1","typ":"JWT"}"#;

    #[test]
    fn a_crit_header_is_refused() {
        let k = key(1);
        for header in [
            r#"{"alg":"EdDSA","kid":"k1","crit":["b64"],"b64":false}"#,
            r#"{"alg":"EdDSA","kid":"k1","crit":[]}"#,
        ] {
            let token = sign_raw(header, &claims_json(""), &k);
            assert!(
                matches!(
                    verify_token(&token, &keyset("k1", &k), NOW, &rules()),
                    Err(AuthError::Malformed(_))
                ),
                "{header}"
            );
        }
        let token = sign_raw(HDR, &claims_json(""), &k);
        assert!(verify_token(&token, &keyset("k1", &k), NOW, &rules()).is_ok());
    }

    fn claims_json(extra: &str) -> String {
        format!(
            r#"{{"sub":"user-1","email":"a@b.c","role":"admin","sid":"s-9","iss":"https://auth.example","aud":"mana","iat":{NOW},"exp":{}{extra}}}"#,
            NOW + 900
        )
    }

    fn good_token() -> String {
        sign_raw(HDR, &claims_json(""), &key(1))
    }

    fn check(token: &str) -> Result<Claims, AuthError> {
        verify_token(token, &keyset("k1", &key(1)), NOW, &rules())
    }

    fn check_claims_json(claims: &str) -> Result<Claims, AuthError> {
        check(&sign_raw(HDR, claims, &key(1)))
    }

    #[test]
    fn valid_token() {
        let c = check(&good_token()).unwrap();
        assert_eq!(c.sub, "user-1");
        assert_eq!(c.exp, NOW + 900);
        assert_eq!(c.email.as_deref(), Some("a@b.c"));
        assert_eq!(c.role.as_deref(), Some("admin"));
        assert_eq!(c.sid.as_deref(), Some("s-9"));
    }

    #[test]
    fn expired_and_leeway() {
        let exp = |e: i64| {
            format!(r#"{{"sub":"u","iss":"https://auth.example","aud":"mana","exp":{e}}}"#)
        };
        assert_eq!(check_claims_json(&exp(NOW - 31)), Err(AuthError::Expired));
        assert!(check_claims_json(&exp(NOW - 30)).is_ok());
        assert!(check_claims_json(&exp(NOW - 1)).is_ok());
        // Fractional NumericDate is accepted.
        assert!(check_claims_json(&format!(
            r#"{{"sub":"u","iss":"https://auth.example","aud":"mana","exp":{}.5}}"#,
            NOW + 10
        ))
        .is_ok());
        // Absurd values saturate rather than panic.
        assert!(check_claims_json(
            r#"{"sub":"u","iss":"https://auth.example","aud":"mana","exp":1e300}"#
        )
        .is_ok());
        assert!(check_claims_json(&format!(
            r#"{{"sub":"u","iss":"https://auth.example","aud":"mana","exp":{}}}"#,
            i64::MAX
        ))
        .is_ok());
    }

    #[test]
    fn not_yet_valid() {
        let nbf = |n: i64| {
            format!(
                r#"{{"sub":"u","iss":"https://auth.example","aud":"mana","exp":{},"nbf":{n}}}"#,
                NOW + 900
            )
        };
        assert_eq!(
            check_claims_json(&nbf(NOW + 31)),
            Err(AuthError::NotYetValid)
        );
        assert!(check_claims_json(&nbf(NOW + 30)).is_ok());
        assert!(check_claims_json(&nbf(NOW - 5)).is_ok());
        assert!(matches!(
            check_claims_json(&format!(
                r#"{{"sub":"u","iss":"https://auth.example","aud":"mana","exp":{},"nbf":"soon"}}"#,
                NOW + 900
            )),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn bad_signature_flipped_byte() {
        let t = good_token();
        let dot = t.rfind('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(&t[dot + 1..]).unwrap();
        sig[10] ^= 0x01;
        let forged = format!("{}.{}", &t[..dot], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(check(&forged), Err(AuthError::BadSignature));

        // Changing the payload while keeping the signature.
        let parts: Vec<&str> = t.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(claims_json(r#","role2":"x""#));
        let forged = format!("{}.{}.{}", parts[0], other, parts[2]);
        assert_eq!(check(&forged), Err(AuthError::BadSignature));
    }

    #[test]
    fn other_key_same_kid() {
        let t = sign_raw(HDR, &claims_json(""), &key(2));
        assert_eq!(check(&t), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_and_hs256_rejected() {
        let claims = URL_SAFE_NO_PAD.encode(claims_json(""));
        let none_hdr = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
        let t = format!("{none_hdr}.{claims}.");
        assert_eq!(
            check(&t),
            Err(AuthError::UnsupportedAlgorithm("none".into()))
        );
        let t = sign_raw(r#"{"alg":"HS256","kid":"k1"}"#, &claims_json(""), &key(1));
        assert_eq!(
            check(&t),
            Err(AuthError::UnsupportedAlgorithm("HS256".into()))
        );
        let t = sign_raw(r#"{"alg":"eddsa","kid":"k1"}"#, &claims_json(""), &key(1));
        assert!(matches!(check(&t), Err(AuthError::UnsupportedAlgorithm(_))));
        // The echoed alg is bounded and printable.
        let long = format!(r#"{{"alg":"{}\n","kid":"k1"}}"#, "A".repeat(500));
        let t = sign_raw(&long, &claims_json(""), &key(1));
        match check(&t) {
            Err(AuthError::UnsupportedAlgorithm(a)) => {
                assert!(a.chars().count() <= MAX_ECHOED_LEN + 1);
                assert!(!a.contains('\n'));
            }
            other => panic!("unexpected {other:?}"),
        }
        // alg missing / not a string.
        let t = sign_raw(r#"{"kid":"k1"}"#, &claims_json(""), &key(1));
        assert!(matches!(check(&t), Err(AuthError::Malformed(_))));
        let t = sign_raw(r#"{"alg":1,"kid":"k1"}"#, &claims_json(""), &key(1));
        assert!(matches!(check(&t), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn unknown_kid_and_missing_kid() {
        let t = sign_raw(r#"{"alg":"EdDSA","kid":"nope"}"#, &claims_json(""), &key(1));
        assert_eq!(check(&t), Err(AuthError::UnknownKey));

        // No kid, one key in the set: that key is used.
        let t = sign_raw(r#"{"alg":"EdDSA"}"#, &claims_json(""), &key(1));
        assert!(check(&t).is_ok());
        // No kid, several keys: no guessing.
        let mut ks = keyset("k1", &key(1));
        ks.insert("k2", key(2).verifying_key());
        assert_eq!(
            verify_token(&t, &ks, NOW, &rules()),
            Err(AuthError::UnknownKey)
        );
        // Empty key set.
        assert_eq!(
            verify_token(&good_token(), &KeySet::new(), NOW, &rules()),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn subject_checks() {
        let e = NOW + 900;
        let base = r#""iss":"https://auth.example","aud":"mana""#;
        assert_eq!(
            check_claims_json(&format!(r#"{{{base},"exp":{e}}}"#)),
            Err(AuthError::MissingSubject)
        );
        assert_eq!(
            check_claims_json(&format!(r#"{{{base},"exp":{e},"sub":""}}"#)),
            Err(AuthError::MissingSubject)
        );
        assert_eq!(
            check_claims_json(&format!(r#"{{{base},"exp":{e},"sub":42}}"#)),
            Err(AuthError::MissingSubject)
        );
    }

    #[test]
    fn missing_or_bad_exp() {
        let base = r#""sub":"u","iss":"https://auth.example","aud":"mana""#;
        for claims in [
            format!(r#"{{{base}}}"#),
            format!(r#"{{{base},"exp":"tomorrow"}}"#),
            format!(r#"{{{base},"exp":null}}"#),
        ] {
            assert!(
                matches!(check_claims_json(&claims), Err(AuthError::Malformed(_))),
                "{claims}"
            );
        }
    }

    #[test]
    fn issuer_checks() {
        let e = NOW + 900;
        let wrong = format!(r#"{{"sub":"u","iss":"https://evil","aud":"mana","exp":{e}}}"#);
        let absent = format!(r#"{{"sub":"u","aud":"mana","exp":{e}}}"#);
        assert_eq!(check_claims_json(&wrong), Err(AuthError::WrongIssuer));
        assert_eq!(check_claims_json(&absent), Err(AuthError::WrongIssuer));
        let lax = Rules {
            issuer: None,
            ..rules()
        };
        let ks = keyset("k1", &key(1));
        for c in [&wrong, &absent] {
            assert!(verify_token(&sign_raw(HDR, c, &key(1)), &ks, NOW, &lax).is_ok());
        }
    }

    #[test]
    fn audience_checks() {
        let e = NOW + 900;
        let with_aud = |aud: &str| {
            format!(r#"{{"sub":"u","iss":"https://auth.example","aud":{aud},"exp":{e}}}"#)
        };
        assert!(check_claims_json(&with_aud(r#""mana""#)).is_ok());
        assert!(check_claims_json(&with_aud(r#"["other","mana"]"#)).is_ok());
        assert!(check_claims_json(&with_aud(r#"[1,null,"mana"]"#)).is_ok());
        for bad in [r#""other""#, r#"["other"]"#, "[]", "null", "7", r#""MANA""#] {
            assert_eq!(
                check_claims_json(&with_aud(bad)),
                Err(AuthError::WrongAudience),
                "{bad}"
            );
        }
        let absent = format!(r#"{{"sub":"u","iss":"https://auth.example","exp":{e}}}"#);
        assert_eq!(check_claims_json(&absent), Err(AuthError::WrongAudience));
        let lax = Rules {
            audience: None,
            ..rules()
        };
        let ks = keyset("k1", &key(1));
        assert!(verify_token(&sign_raw(HDR, &absent, &key(1)), &ks, NOW, &lax).is_ok());
    }

    #[test]
    fn malformed_inputs() {
        let t = good_token();
        let parts: Vec<&str> = t.split('.').collect();
        let cases: Vec<String> = vec![
            String::new(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{t}.{}", parts[2]),
            format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}+/.{}", parts[0], parts[1], parts[2]),
            format!("{} .{}.{}", parts[0], parts[1], parts[2]),
            format!("{}é.{}.{}", parts[0], parts[1], parts[2]),
            // Length 4n+1 is never valid base64.
            format!("AAAAA.{}.{}", parts[1], parts[2]),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("not json"),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("[1,2]"),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("\"EdDSA\""),
                parts[1],
                parts[2]
            ),
            format!("{}.{}.", parts[0], parts[1]),
            format!("{}.{}.AAAA", parts[0], parts[1]),
            "..".into(),
            "a".repeat(MAX_TOKEN_LEN + 1),
            format!("{t}{}", "A".repeat(MAX_TOKEN_LEN)),
        ];
        for c in &cases {
            let r = check(c);
            assert!(matches!(r, Err(AuthError::Malformed(_))), "{c:.80}: {r:?}");
            // The error text must never echo the token.
            if c.len() > 8 {
                assert!(!r.unwrap_err().to_string().contains(c.as_str()));
            }
        }
        // Non-canonical trailing bits in a segment are rejected too.
        let hdr = URL_SAFE_NO_PAD.encode(HDR);
        let mut bad = hdr.clone();
        let last = bad.pop().unwrap();
        // Find a sibling char that decodes to the same bytes but differs in
        // the unused low bits; strict decoding must refuse it.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.iter().position(|&c| c as char == last).unwrap();
        // 38 header bytes encode to 51 chars: the last char carries 2
        // unused bits, so flipping its lowest bit keeps the decoded bytes.
        assert_eq!(hdr.len() % 4, 3);
        bad.push(alphabet[idx ^ 1] as char);
        let t2 = format!("{bad}.{}.{}", parts[1], parts[2]);
        assert!(matches!(check(&t2), Err(AuthError::Malformed(_))));
        // Payload that is signed but not an object.
        let t = sign_raw(HDR, "[1]", &key(1));
        assert!(matches!(check(&t), Err(AuthError::Malformed(_))));
        let t = sign_raw(HDR, "garbage", &key(1));
        assert!(matches!(check(&t), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn decode_header_reports_kid() {
        let h = decode_header(&good_token()).unwrap();
        assert_eq!(h.alg, "EdDSA");
        assert_eq!(h.kid.as_deref(), Some("k1"));
        assert_eq!(h.typ.as_deref(), Some("JWT"));
        let t = sign_raw(r#"{"alg":"EdDSA","kid":""}"#, "{}", &key(1));
        assert_eq!(decode_header(&t).unwrap().kid, None);
    }

    #[test]
    fn detailed_verification_reports_what_it_used() {
        let ks = keyset("k1", &key(1));
        let v = verify_token_detailed(&good_token(), &ks, NOW, &rules()).unwrap();
        assert_eq!(v.claims, check(&good_token()).unwrap());
        assert_eq!(v.nbf, None);
        assert_eq!(v.kid.as_deref(), Some("k1"));
        assert_eq!(&v.key, key(1).verifying_key().as_bytes());
        assert_eq!(ks.select(Some("k1")), Some(&key(1).verifying_key()));
        assert_eq!(ks.select(None), Some(&key(1).verifying_key()));

        let t = sign_raw(
            r#"{"alg":"EdDSA"}"#,
            &claims_json(&format!(r#","nbf":{NOW}"#)),
            &key(1),
        );
        let v = verify_token_detailed(&t, &ks, NOW, &rules()).unwrap();
        assert_eq!((v.kid, v.nbf), (None, Some(NOW)));
        // The time rule alone, with the same boundaries as above.
        assert_eq!(check_time_window(NOW, None, NOW + 30, 30), Ok(()));
        assert_eq!(
            check_time_window(NOW, None, NOW + 31, 30),
            Err(AuthError::Expired)
        );
        assert_eq!(
            check_time_window(NOW + 900, Some(NOW + 31), NOW, 30),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            check_time_window(NOW + 10, Some(NOW + 5), NOW + 1, -3),
            Err(AuthError::NotYetValid)
        );
        // Expiry is reported first, as in verify_token.
        assert_eq!(
            check_time_window(NOW, Some(NOW + 100), NOW + 50, 0),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn keyset_merge() {
        let mut a = keyset("k1", &key(1));
        let mut b = keyset("k1", &key(2));
        b.insert("k2", key(3).verifying_key());
        a.merge(b);
        assert_eq!(a.len(), 2);
        assert_eq!(a.get("k1"), Some(&key(2).verifying_key()));
        assert!(a.contains("k2") && !a.is_empty());
    }

    /// Deterministic xorshift64* so failures reproduce without a rand crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn property_mutations_never_panic_or_forge() {
        let original = good_token();
        let expected = check(&original).unwrap();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00";
        let mut accepted_changed = 0;
        for _ in 0..3000 {
            let mut bytes = original.clone().into_bytes();
            for _ in 0..=rng.below(3) {
                match rng.below(4) {
                    0 => {
                        let i = rng.below(bytes.len());
                        bytes[i] = alphabet[rng.below(alphabet.len())];
                    }
                    1 => {
                        let i = rng.below(bytes.len());
                        bytes[i] = rng.next() as u8;
                    }
                    2 if bytes.len() > 1 => {
                        let i = rng.below(bytes.len());
                        bytes.remove(i);
                    }
                    _ => {
                        let i = rng.below(bytes.len() + 1);
                        bytes.insert(i, alphabet[rng.below(alphabet.len())]);
                    }
                }
            }
            let mutated = String::from_utf8_lossy(&bytes).into_owned();
            let result = check(&mutated);
            let _ = decode_header(&mutated);
            if let Ok(c) = result {
                assert_eq!(c, expected, "mutation produced different accepted claims");
                if mutated != original {
                    accepted_changed += 1;
                }
            }
        }
        // Strict base64 + verify_strict leave no alternative encodings.
        assert_eq!(accepted_changed, 0);
    }
}
