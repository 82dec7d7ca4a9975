use super::*;
use crate::auth::devkeys::sign_raw;
use crate::test_rng::Rng;
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
    let exp =
        |e: i64| format!(r#"{{"sub":"u","iss":"https://auth.example","aud":"mana","exp":{e}}}"#);
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
    let with_aud =
        |aud: &str| format!(r#"{{"sub":"u","iss":"https://auth.example","aud":{aud},"exp":{e}}}"#);
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

#[test]
fn property_mutations_never_panic_or_forge() {
    let original = good_token();
    let expected = check(&original).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00";
    let mut accepted_changed = 0;
    for _ in 0..3000 {
        let mut bytes = original.clone().into_bytes();
        for _ in 0..=rng.index(3) {
            match rng.index(4) {
                0 => {
                    let i = rng.index(bytes.len());
                    bytes[i] = alphabet[rng.index(alphabet.len())];
                }
                1 => {
                    let i = rng.index(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
                2 if bytes.len() > 1 => {
                    let i = rng.index(bytes.len());
                    bytes.remove(i);
                }
                _ => {
                    let i = rng.index(bytes.len() + 1);
                    bytes.insert(i, alphabet[rng.index(alphabet.len())]);
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
