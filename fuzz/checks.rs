//! Invariant checks shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the replay test
//! (`tests/fuzz_regressions.rs`).
//!
//! Both include this file with `#[path]`, so a fuzz target and its regression replay run exactly the
//! same code. Every `check_*` function takes the raw fuzz input, feeds it to one library function and
//! panics when an invariant is broken; returning normally means the input is fine (an `Err` from the
//! library is a fine outcome: hostile input must be rejected, never crash).
//!
//! Only `mana_sync` (with its `test-support` feature, on in `fuzz/Cargo.toml` and for `cargo test`) and its
//! own dependencies (serde_json, ed25519-dalek, hyper, base64) are used, so the file compiles inside the
//! main crate's integration tests without touching its Cargo.toml.

#![allow(dead_code)] // each fuzz target uses one check

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, SigningKey};
use hyper::Method;
use serde_json::Value;

use mana_sync::auth::{self, KeySet, Rules};
use mana_sync::http::router::{self, Route, Routing};
use mana_sync::protocol::{self, query, time, Op, StoredChange};
use mana_sync::test_support::percent_encode;

/// The server time used for push bodies and token checks: 2026-11-21T10:05:00Z.
pub const NOW_UNIX: i64 = 1_795_255_500;
pub const NOW_MICROS: i64 = NOW_UNIX * 1_000_000;

/// The signing key of the `jwt` target. Seeds in `fuzz/seeds/jwt/` are signed with it.
pub const SIGNING_KEY_BYTES: [u8; 32] = *b"mana-sync fuzz fixed signing key";
pub const KID: &str = "k1";
pub const ISSUER: &str = "https://auth.mana.how";
pub const AUDIENCE: &str = "mana";
pub const LEEWAY_SECS: i64 = 30;

/// Pull page sizes of SPEC §4.
pub const DEFAULT_LIMIT: usize = 1_000;
pub const MAX_LIMIT: usize = 5_000;

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z: the range `format_cursor` can write.
pub const CURSOR_MIN: i64 = -62_135_596_800_000_000;
pub const CURSOR_MAX: i64 = 253_402_300_799_999_999;

/// Separates the JSON documents of the `wire_change` and `jwt` inputs (never valid in JSON or UTF-8).
pub const SEPARATOR: u8 = 0xff;

/// The same offset `store::timestamp` adds when it decodes a `timestamptz`.
const POSTGRES_EPOCH_OFFSET: i64 = 946_684_800_000_000;

// ---------------------------------------------------------------------------------------------- push_body

/// `protocol::parse_changeset` on a raw push body: never panics, and what it accepts is storable.
pub fn check_push_body(data: &[u8]) {
    let body = || bytes::Bytes::copy_from_slice(data);
    let Ok(changeset) = protocol::parse_changeset(body()) else {
        return;
    };
    assert_eq!(
        protocol::parse_changeset(body()).as_ref(),
        Ok(&changeset),
        "parsing is not deterministic"
    );
    // A large batch keeps only spans of its body and parses them again: the same changes.
    let spans = protocol::changeset::parse_changeset_keeping(body(), 0)
        .expect("accepted once, accepted as spans");
    let all = 0..changeset.changes.len();
    let parsed = changeset.changes.slice(all.clone()).expect("parsed");
    assert_eq!(
        spans
            .changes
            .slice(all)
            .expect("spans parse again")
            .as_ref(),
        parsed.as_ref(),
        "spans differ from the parsed changes"
    );
    assert_eq!(spans.tables, changeset.tables);
    if let Some(client_id) = &changeset.client_id {
        assert!(!client_id.is_empty() && client_id.len() <= 512);
        assert!(!client_id.chars().any(char::is_control));
    }
    for (index, change) in parsed.iter().enumerate() {
        let at = |what: &str| format!("change {index}: {what}");
        assert!(protocol::is_identifier(&change.table), "{}", at("table"));
        assert!(
            !change.record_id.is_empty() && change.record_id.len() <= 512,
            "{}",
            at("record id length")
        );
        assert!(
            !change.record_id.chars().any(char::is_control),
            "{}",
            at("record id has control characters")
        );
        assert!(
            change.schema_version <= protocol::SUPPORTED_SCHEMA_VERSION,
            "{}",
            at("schema version above the supported one")
        );
        // PostgreSQL cannot store U+0000 in JSONB or TEXT: the parser must have rejected it.
        assert!(!map_has_nul(&change.data), "{}", at("NUL in data"));
        assert!(
            !map_has_nul(&change.field_meta),
            "{}",
            at("NUL in field_meta")
        );
        assert!(
            !change.actor.as_ref().is_some_and(value_has_nul),
            "{}",
            at("NUL in actor")
        );
        for text in [&change.space_id, &change.origin].into_iter().flatten() {
            assert!(!text.contains('\0'), "{}", at("NUL in spaceId/origin"));
        }
        assert!(
            !matches!(change.actor, Some(Value::Null)),
            "{}",
            at("actor stored as JSON null")
        );
        // Every stored field timestamp is a string the merge can compare as an instant.
        for (name, value) in &change.field_meta {
            let Value::String(text) = value else {
                panic!("{}", at(&format!("field_meta.{name} is not a string")));
            };
            assert!(
                time::parse_rfc3339(text).is_ok(),
                "{}",
                at(&format!("field_meta.{name} = {text:?} is not a timestamp"))
            );
        }
        match change.op {
            Op::Insert => {}
            Op::Update => assert!(
                !change.data.is_empty(),
                "{}",
                at("update without any field")
            ),
            Op::Delete => {
                // A delete's deletedAt, when it has one, is a timestamp in both places; without one the
                // server assigns it when storing the delete (and the emitted delete below still carries one).
                let stored = change.data.get("deletedAt").and_then(Value::as_str);
                let meta = change.field_meta.get("deletedAt").and_then(Value::as_str);
                if let Some(deleted_at) = stored {
                    assert_eq!(
                        Some(deleted_at),
                        meta,
                        "{}",
                        at("deletedAt differs in data/field_meta")
                    );
                    assert!(
                        time::parse_rfc3339(deleted_at).is_ok(),
                        "{}",
                        at("deletedAt is not a timestamp")
                    );
                }
            }
        }
        // What gets stored must come back out as a well-formed wire change.
        let stored = StoredChange {
            event_id: format!("event-{index}"),
            table: change.table.clone(),
            record_id: change.record_id.clone(),
            op: change.op,
            data: Some(Value::Object(change.data.clone())),
            field_meta: Some(Value::Object(change.field_meta.clone())),
            created_at: NOW_MICROS,
            schema_version: change.schema_version,
            actor: change.actor.clone(),
            origin: change.origin.clone(),
            space_id: change.space_id.clone(),
        };
        check_wire_json(&stored);
    }
}

// --------------------------------------------------------------------------------------------- pull_query

/// `query::parse_query` and `protocol::parse_pull_query` on a query string.
pub fn check_pull_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pairs = query::parse_query(text);
    let pull = protocol::parse_pull_query(Some(text), DEFAULT_LIMIT, MAX_LIMIT);
    if let Ok(pairs) = &pairs {
        // Decoding is the inverse of encoding: re-encoding the pairs and decoding again is lossless.
        let encoded = pairs
            .iter()
            .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            query::parse_query(&encoded).as_ref(),
            Ok(pairs),
            "re-encoded query {encoded:?} decodes differently"
        );
    }
    let Ok(pull) = pull else {
        return;
    };
    let Ok(pairs) = pairs else {
        panic!("parse_pull_query accepted a query parse_query rejects");
    };
    assert!(protocol::is_identifier(&pull.collection));
    assert!(
        (1..=MAX_LIMIT).contains(&pull.limit),
        "limit {}",
        pull.limit
    );
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(first("collection"), Some(pull.collection.as_str()));
    let since = first("since").expect("accepted a pull without since");
    assert_eq!(time::parse_rfc3339(since), Ok(pull.since));
    if matches!(first("limit"), None | Some("")) {
        assert_eq!(pull.limit, DEFAULT_LIMIT);
    }
}

// ---------------------------------------------------------------------------------------------- timestamp

/// `time::parse_rfc3339` and `time::format_cursor`: parse ∘ format is the identity on 0001–9999, cursors
/// are 27 bytes and their string order is time order.
pub fn check_timestamp(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(v) = time::parse_rfc3339(text) {
            let cursor = time::format_cursor(v);
            assert_eq!(cursor.len(), 27, "{cursor:?}");
            if (CURSOR_MIN..=CURSOR_MAX).contains(&v) {
                assert_eq!(
                    time::parse_rfc3339(&cursor),
                    Ok(v),
                    "{text:?} parsed to {v}, formatted as {cursor:?}"
                );
            }
            if is_canonical_cursor_shape(text) {
                assert_eq!(
                    cursor, text,
                    "a cursor in canonical form must format back to itself"
                );
            }
        }
    }
    // The same bytes as two raw instants: formatting round-trips and keeps the order.
    if let (Some(a), Some(b)) = (data.get(..8), data.get(8..16)) {
        let a = i64::from_le_bytes(a.try_into().expect("8 bytes"));
        let b = i64::from_le_bytes(b.try_into().expect("8 bytes"));
        let (fa, fb) = (time::format_cursor(a), time::format_cursor(b));
        assert_eq!(fa.len(), 27, "{fa:?}");
        assert_eq!(fb.len(), 27, "{fb:?}");
        assert_eq!(
            time::parse_rfc3339(&fa),
            Ok(a.clamp(CURSOR_MIN, CURSOR_MAX)),
            "{a}"
        );
        assert_eq!(
            a.clamp(CURSOR_MIN, CURSOR_MAX)
                .cmp(&b.clamp(CURSOR_MIN, CURSOR_MAX)),
            fa.cmp(&fb),
            "string order differs from time order: {fa:?} vs {fb:?}"
        );
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the form `format_cursor` writes.
fn is_canonical_cursor_shape(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 27
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            26 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

// -------------------------------------------------------------------------------------------- wire_change

/// `StoredChange::to_wire` on a row built from the input.
///
/// Layout: byte 0 picks `op` (insert, update, delete, or a foreign value), byte 1 holds flags and the
/// schema version, bytes 2..10 are the raw PostgreSQL `timestamptz` (big endian, as the store decodes it),
/// then up to three JSON documents separated by 0xFF: `data`, `field_meta`, `actor` (each absent when it
/// is not valid JSON).
pub fn check_wire_change(data: &[u8]) {
    let (Some(&op), Some(&flags), Some(raw_time), rest) = (
        data.first(),
        data.get(1),
        data.get(2..10),
        data.get(10..).unwrap_or_default(),
    ) else {
        return;
    };
    let mut docs = rest
        .split(|&b| b == SEPARATOR)
        .map(|doc| serde_json::from_slice::<Value>(doc).ok());
    let created_at = i64::from_be_bytes(raw_time.try_into().expect("8 bytes"))
        .saturating_add(POSTGRES_EPOCH_OFFSET);
    let stored = StoredChange {
        event_id: "00000000-0000-4000-8000-000000000001".into(),
        table: "tasks".into(),
        record_id: "rec-1".into(),
        op: Op::from_stored(match op % 5 {
            0 => "insert",
            1 => "update",
            2 => "delete",
            3 => "",
            _ => "upsert",
        }),
        data: docs.next().flatten(),
        field_meta: docs.next().flatten(),
        created_at,
        schema_version: i32::from(flags >> 3) - 8,
        actor: docs.next().flatten(),
        origin: (flags & 1 != 0).then(|| "user".into()),
        space_id: (flags & 2 != 0).then(|| "space-1".into()),
    };
    check_wire_json(&stored);
}

/// The invariants of SPEC §2 on the JSON a stored change is emitted as.
fn check_wire_json(stored: &StoredChange) {
    let wire = stored.to_wire();
    let json = serde_json::to_value(&wire).expect("a wire change serialises");
    let text = serde_json::to_string(&wire).expect("a wire change serialises");
    let Value::Object(object) = json else {
        panic!("a wire change is not a JSON object: {text}");
    };
    for key in ["eventId", "table", "id", "op"] {
        assert!(
            object.get(key).is_some_and(Value::is_string),
            "{key} missing: {text}"
        );
    }
    for key in ["data", "fields", "deletedAt", "spaceId", "actor", "origin"] {
        assert!(
            !object.get(key).is_some_and(Value::is_null),
            "optional key {key} emitted as null: {text}"
        );
    }
    assert!(
        object
            .get("schemaVersion")
            .and_then(Value::as_i64)
            .is_some_and(|v| v >= 1),
        "schemaVersion below 1: {text}"
    );
    if let Some(Value::Object(fields)) = object.get("fields") {
        for (name, entry) in fields {
            let Value::Object(entry) = entry else {
                panic!("fields.{name} is not an object: {text}");
            };
            assert!(
                entry.contains_key("value"),
                "fields.{name} has no value: {text}"
            );
            assert!(
                entry.get("at").is_some_and(Value::is_string),
                "fields.{name} has no at string: {text}"
            );
            assert_ne!(name, "id", "fields lists id: {text}");
        }
    }
    match object.get("op").and_then(Value::as_str) {
        Some("insert") => assert!(
            object.get("data").is_some_and(Value::is_object),
            "insert without data: {text}"
        ),
        Some("update") => assert!(
            object.get("fields").is_some_and(Value::is_object),
            "update without fields: {text}"
        ),
        Some("delete") => {
            assert!(
                object.get("deletedAt").is_some_and(Value::is_string),
                "delete without deletedAt: {text}"
            );
            if let Some(Value::Object(fields)) = object.get("fields") {
                assert!(
                    !fields.contains_key("deletedAt"),
                    "deletedAt repeated in fields: {text}"
                );
            }
        }
        other => panic!("op {other:?} is not insert, update or delete: {text}"),
    }
}

// ---------------------------------------------------------------------------------------------------- jwt

/// The fixed key set of the `jwt` target: the public half of [`SIGNING_KEY_BYTES`] under kid `k1`.
pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&SIGNING_KEY_BYTES)
}

pub fn rules() -> Rules<'static> {
    Rules {
        issuer: Some(ISSUER),
        audience: Some(AUDIENCE),
        leeway_secs: LEEWAY_SECS,
    }
}

/// `auth::verify_token` and `auth::decode_header` against a fixed key.
///
/// Without a 0xFF byte the input is a token as sent in `Authorization: Bearer`: verification must never
/// panic and may only succeed for a token whose signature really verifies. With a 0xFF byte the input is
/// `header JSON 0xFF claims JSON`, signed with the fixed key, which lets the fuzzer reach the claim checks:
/// an accepted token must then satisfy every rule of SPEC §8.
pub fn check_jwt(data: &[u8]) {
    let key = signing_key();
    let mut keys = KeySet::new();
    keys.insert(KID, key.verifying_key());
    let rules = rules();

    let signed;
    let token = match data.iter().position(|&b| b == SEPARATOR) {
        None => match std::str::from_utf8(data) {
            Ok(token) => token,
            Err(_) => return,
        },
        Some(at) => {
            let (Ok(header), Ok(claims)) = (
                std::str::from_utf8(&data[..at]),
                std::str::from_utf8(&data[at + 1..]),
            ) else {
                return;
            };
            signed = auth::sign_raw(header, claims, &key);
            &signed
        }
    };

    let header = auth::decode_header(token);
    let Ok(claims) = auth::verify_token(token, &keys, NOW_UNIX, &rules) else {
        return;
    };

    // Accepted: the header named EdDSA and a key we hold, and the signature verifies on its own.
    let header = header.expect("verify_token accepted a token whose header does not decode");
    assert_eq!(header.alg, "EdDSA");
    assert!(
        matches!(header.kid.as_deref(), None | Some(KID)),
        "kid {:?}",
        header.kid
    );
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted a token without three segments");
    let signature: [u8; 64] = URL_SAFE_NO_PAD
        .decode(parts[2])
        .expect("accepted an undecodable signature")
        .try_into()
        .expect("accepted a signature that is not 64 bytes");
    key.verifying_key()
        .verify_strict(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &Signature::from_bytes(&signature),
        )
        .expect("accepted a token whose signature does not verify");

    // The claims obey the rules.
    let payload = URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("accepted an undecodable payload");
    let payload: Value =
        serde_json::from_slice(&payload).expect("accepted a payload that is not JSON");
    assert_eq!(
        payload.get("sub").and_then(Value::as_str),
        Some(claims.sub.as_str())
    );
    assert!(!claims.sub.is_empty(), "accepted an empty sub");
    assert!(
        NOW_UNIX <= claims.exp.saturating_add(LEEWAY_SECS),
        "accepted an expired token (exp {})",
        claims.exp
    );
    assert_eq!(
        payload.get("iss").and_then(Value::as_str),
        Some(ISSUER),
        "accepted a wrong iss"
    );
    let audience_ok = match payload.get("aud") {
        Some(Value::String(aud)) => aud == AUDIENCE,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    assert!(
        audience_ok,
        "accepted a wrong aud: {:?}",
        payload.get("aud")
    );
    if let Some(nbf) = payload.get("nbf").and_then(Value::as_f64) {
        assert!(
            nbf <= (NOW_UNIX + LEEWAY_SECS) as f64 + 1.0,
            "accepted a token before its nbf {nbf}"
        );
    }
}

// --------------------------------------------------------------------------------------------------- jwks

/// `auth::jwks::parse_jwks`: never panics; an accepted set holds 1–64 usable keys, each of which appears
/// in the document as an OKP/Ed25519 key under its kid.
pub fn check_jwks(data: &[u8]) {
    let Ok(set) = auth::jwks::parse_jwks(data) else {
        return;
    };
    assert!(
        (1..=auth::jwks::MAX_KEYS).contains(&set.len()),
        "{} keys",
        set.len()
    );
    let doc: Value = serde_json::from_slice(data).expect("accepted a JWKS that is not JSON");
    let jwks = doc
        .get("keys")
        .and_then(Value::as_array)
        .expect("accepted a JWKS without a keys array");
    for kid in set.kids() {
        let key = set.get(kid).expect("a listed kid has a key");
        assert!(!key.is_weak(), "accepted a weak key under kid {kid:?}");
        let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
        let listed = jwks.iter().any(|jwk| {
            let kid_matches = match jwk.get("kid") {
                None => kid.is_empty(),
                Some(k) => k.as_str() == Some(kid),
            };
            kid_matches
                && jwk.get("kty").and_then(Value::as_str) == Some("OKP")
                && jwk.get("crv").and_then(Value::as_str) == Some("Ed25519")
                && jwk
                    .get("x")
                    .and_then(Value::as_str)
                    .and_then(|text| URL_SAFE_NO_PAD.decode(text).ok())
                    .is_some_and(|bytes| bytes == key.as_bytes())
        });
        assert!(listed, "key {kid:?} ({x}) does not appear in the document");
    }
}

// ------------------------------------------------------------------------------------------------- router

/// `http::router::route`: byte 0 picks the method, the rest is the path.
pub fn check_router(data: &[u8]) {
    let Some((&choice, path)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let method = method(choice);
    let routing = router::route(&method, path);

    // Whether a path exists does not depend on the method.
    let preflight = router::route(&Method::OPTIONS, path);
    let exists = matches!(preflight, Routing::Preflight { .. });
    match &routing {
        Routing::NotFound | Routing::InvalidAppId => {
            assert_eq!(routing, preflight, "{method} {path:?} and OPTIONS disagree")
        }
        _ => assert!(
            exists,
            "{method} {path:?} is {routing:?} but OPTIONS is {preflight:?}"
        ),
    }
    if let Routing::Preflight { allow } | Routing::MethodNotAllowed { allow } = &routing {
        assert!(allow.ends_with("OPTIONS"), "allow {allow:?}");
    }

    match &routing {
        Routing::Found(route) => {
            let expected = if let Route::Push { .. } = route {
                Method::POST
            } else {
                Method::GET
            };
            assert_eq!(method, expected, "{method} {path:?} routed to {route:?}");
            assert!(path.starts_with('/') && !path[1..].split('/').any(str::is_empty));
            let app = match route {
                Route::Push { app }
                | Route::Pull { app }
                | Route::AppStream { app }
                | Route::AppSocket { app } => Some(app),
                _ => None,
            };
            if let Some(app) = app {
                assert!(protocol::is_identifier(app), "app {app:?} from {path:?}");
                assert!(
                    path.split('/').any(|s| s == app),
                    "app {app:?} is not in {path:?}"
                );
            }
        }
        Routing::Preflight { .. } => assert_eq!(method, Method::OPTIONS),
        Routing::MethodNotAllowed { allow } => {
            assert!(method != Method::OPTIONS);
            assert!(
                !allow.split(", ").any(|m| m == method.as_str()),
                "{method} {path:?} is not allowed although Allow lists it: {allow:?}"
            );
        }
        Routing::InvalidAppId | Routing::NotFound => {}
    }
}

fn method(choice: u8) -> Method {
    match choice % 6 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::OPTIONS,
        3 => Method::PUT,
        4 => Method::DELETE,
        _ => Method::from_bytes(b"PROPFIND").expect("a valid extension method"),
    }
}

// ---------------------------------------------------------------------------------------------- helpers

fn value_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(value_has_nul),
        Value::Object(map) => map_has_nul(map),
        _ => false,
    }
}

fn map_has_nul(map: &serde_json::Map<String, Value>) -> bool {
    map.iter()
        .any(|(k, v)| k.contains('\0') || value_has_nul(v))
}

/// A WebSocket client message through `protocol::realtime::parse_client_message`: never panics; an accepted
/// `auth` carries a non-empty token and a client id without control characters; anything over the frame
/// cap is refused.
pub fn check_ws_message(data: &[u8]) {
    use mana_sync::protocol::realtime::{
        parse_client_message, ClientMessage, MAX_CLIENT_MESSAGE_BYTES,
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_message(text) {
        Ok(ClientMessage::Auth { token, client_id }) => {
            assert!(!token.is_empty(), "auth accepted without a token");
            if let Some(id) = client_id {
                assert!(
                    !id.is_empty() && !id.chars().any(char::is_control),
                    "bad clientId accepted: {id:?}"
                );
            }
            assert!(text.len() <= MAX_CLIENT_MESSAGE_BYTES);
        }
        Ok(ClientMessage::Ping) => assert!(text.len() <= MAX_CLIENT_MESSAGE_BYTES),
        Err(message) => assert!(!message.is_empty()),
    }
}

/// A stream query and `Last-Event-ID` through `protocol::realtime::parse_stream_query`: input is
/// `query \n last-event-id`. Never panics; accepted names are identifiers; `Last-Event-ID`, when present and
/// accepted, decides the cursor, which then round-trips through the fixed-width format.
pub fn check_stream_query(data: &[u8]) {
    use mana_sync::protocol::realtime::{parse_event_id, parse_stream_query};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (query, last_event_id) = match text.split_once('\n') {
        Some((q, id)) => (q, Some(id)),
        None => (text, None),
    };
    for list in ["collections", "apps"] {
        if let Ok(parsed) = parse_stream_query(Some(query), list, last_event_id) {
            if let Some(names) = &parsed.names {
                assert!(
                    names.iter().all(|n| protocol::is_identifier(n)),
                    "{names:?}"
                );
            }
            if let Some(id) = last_event_id.map(str::trim).filter(|id| !id.is_empty()) {
                assert_eq!(
                    parse_event_id(id).ok(),
                    Some(parsed.since),
                    "Last-Event-ID must win over since"
                );
            }
            if (CURSOR_MIN..=253_402_300_799_999_999).contains(&parsed.since) {
                assert_eq!(
                    time::parse_rfc3339(&time::format_cursor(parsed.since)),
                    Ok(parsed.since)
                );
            }
        }
    }
}

/// One target's check: panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every check by target name, for the replay test.
pub const CHECKS: &[(&str, Check)] = &[
    ("push_body", check_push_body),
    ("pull_query", check_pull_query),
    ("timestamp", check_timestamp),
    ("wire_change", check_wire_change),
    ("jwt", check_jwt),
    ("jwks", check_jwks),
    ("router", check_router),
    ("ws_message", check_ws_message),
    ("stream_query", check_stream_query),
];
