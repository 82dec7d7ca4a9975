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
pub(crate) const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Attacker-controlled strings (the `alg` value) end up in error messages
/// and logs, so they are truncated to this many characters.
const MAX_ECHOED_LEN: usize = 32;

/// The only algorithm accepted. Compared byte-for-byte: "eddsa" or
/// "EdDSA " are not the same algorithm name per RFC 7515.
pub(crate) const ALG_EDDSA: &str = "EdDSA";

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

    pub(crate) fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Union of both sets; on a `kid` collision `other` wins because it is
    /// the fresher source in every call site.
    pub(crate) fn merge(&mut self, other: KeySet) {
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
    pub(crate) fn select(&self, kid: Option<&str>) -> Option<&VerifyingKey> {
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
    pub(crate) typ: Option<String>,
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
pub(crate) struct Verified {
    pub(crate) claims: Claims,
    /// The token's `nbf`, if it has one (`exp` is in `claims`).
    pub(crate) nbf: Option<i64>,
    /// The `kid` the key was selected by; `None` for a token without one.
    pub(crate) kid: Option<String>,
    /// The public key the signature was verified with.
    pub(crate) key: [u8; ed25519_dalek::PUBLIC_KEY_LENGTH],
}

/// [`verify_token`], also reporting the `nbf`, `kid` and key it used.
pub(crate) fn verify_token_detailed(
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
pub(crate) fn check_time_window(
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
mod tests;
