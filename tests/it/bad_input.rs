//! Bad input from the open internet (SPEC §1, §2, §3, §4, §7, §8, §12): a data-driven matrix of requests
//! that must each be refused with the right status and JSON error code and leave the database exactly as it
//! was, plus a few cases that are special because they must *succeed* (a 9 MB string, an opaque actor of
//! any JSON type, 10,000 and 100,000 tiny changes) and a table of WebSocket abuse.
//!
//! Cases that existing suites already cover (http_errors.rs: 415 text/plain, truncated JSON, 513-byte
//! X-Client-Id, missing/garbage pull parameters, `bad*id` app ids; push_pull.rs: 11 MB body, change 149
//! invalid, U+0000 in data values; auth.rs: every JWT check on pull; realtime.rs: binary frame before auth,
//! 64 KiB frame and ping flood after auth) are not repeated here except where the matrix adds the
//! "database unchanged" check on the push path.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures_util::SinkExt;
use mana_sync::auth::devkeys;
use mana_sync::clock::unix_now;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    self, changeset, count_rows, insert, keys, next_frame, percent_encode, raw_request, send_json,
    token, unique_user, Received, Reply, TestServer, LOG_START,
};

const WAIT: Duration = Duration::from_secs(10);

/// How the request of a case authenticates.
enum Auth {
    /// A valid token of the case user.
    Valid,
    /// No Authorization header.
    Missing,
    /// This exact Authorization header value.
    Header(String),
}

/// What a case sends.
enum Send {
    /// Through a real HTTP client.
    Http {
        method: &'static str,
        path: String,
        auth: Auth,
        headers: Vec<(&'static str, String)>,
        body: Option<Vec<u8>>,
    },
    /// Raw bytes on a TCP connection: the request line and headers (without the final blank line; the
    /// placeholder `{auth}` is replaced by a valid Authorization value), then the body.
    Raw { head: String, body: Vec<u8> },
}

/// What a case must get back.
enum Expect {
    /// `{"error": code, "message": …}` with this status.
    Json(u16, &'static str),
    /// Refused by the HTTP/1.1 parser before the application sees it: this status, no JSON body.
    Parser(u16),
}

struct Case {
    name: String,
    send: Send,
    expect: Expect,
}

fn case(name: &str, send: Send, expect: Expect) -> Case {
    Case {
        name: name.to_owned(),
        send,
        expect,
    }
}

/// `POST /sync/todo` with a valid token, `Content-Type: application/json` and these bytes.
fn push_bytes(name: &str, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    case(
        name,
        Send::Http {
            method: "POST",
            path: "/sync/todo".into(),
            auth: Auth::Valid,
            headers: vec![("content-type", "application/json".into())],
            body: Some(body.into()),
        },
        Expect::Json(status, code),
    )
}

fn push_json(name: &str, body: Value, code: &'static str) -> Case {
    push_bytes(name, body.to_string(), 400, code)
}

/// A push of one valid insert followed by `bad` (so the error must name change 1 and nothing is written).
/// A JSON value from its text, numbers kept exactly as written (serde_json's `arbitrary_precision`).
fn raw_json(text: &str) -> Value {
    serde_json::from_str(text).expect("test JSON")
}

fn bad_change(name: &str, bad: Value, code: &'static str) -> Case {
    push_json(
        name,
        changeset(vec![insert("tasks", "ok-1", json!({"title": "fine"})), bad]),
        code,
    )
}

/// A push of one valid insert with these extra request headers.
fn push_with(
    name: &str,
    auth: Auth,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
) -> Case {
    let mut all = headers;
    if !all.iter().any(|(name, _)| *name == "content-type") {
        all.push(("content-type", "application/json".to_owned()));
    }
    case(
        name,
        Send::Http {
            method: "POST",
            path: "/sync/todo".into(),
            auth,
            headers: all,
            body: Some(one_insert().to_string().into_bytes()),
        },
        Expect::Json(status, code),
    )
}

/// A push of one valid insert over raw TCP with one extra header line (for bytes an HTTP client refuses
/// to send, such as non-ASCII header values).
fn raw_push(name: &str, header_line: &str, status: u16, code: &'static str) -> Case {
    raw_push_lines(
        name,
        &format!("Authorization: {{auth}}\r\n{header_line}"),
        status,
        code,
    )
}

/// Like [`raw_push`], with `header_line` in place of the Authorization header.
fn raw_push_unauthed(name: &str, header_line: &str, status: u16, code: &'static str) -> Case {
    raw_push_lines(name, header_line, status, code)
}

fn raw_push_lines(name: &str, lines: &str, status: u16, code: &'static str) -> Case {
    let body = one_insert().to_string().into_bytes();
    case(
        name,
        Send::Raw {
            head: format!(
                "POST /sync/todo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n{lines}",
                body.len()
            ),
            body,
        },
        Expect::Json(status, code),
    )
}

/// An authenticated GET over raw TCP with one extra header line.
fn raw_get(name: &str, path: &str, header_line: &str, code: &'static str) -> Case {
    case(
        name,
        Send::Raw {
            head: format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: {{auth}}\r\n{header_line}"
            ),
            body: Vec::new(),
        },
        Expect::Json(400, code),
    )
}

fn get(name: &str, path: String, headers: Vec<(&'static str, String)>, code: &'static str) -> Case {
    get_status(name, path, headers, 400, code)
}

fn get_status(
    name: &str,
    path: String,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
) -> Case {
    case(
        name,
        Send::Http {
            method: "GET",
            path,
            auth: Auth::Valid,
            headers,
            body: None,
        },
        Expect::Json(status, code),
    )
}

fn pull_query(name: &str, query: &str, code: &'static str) -> Case {
    get(name, format!("/sync/todo/pull?{query}"), vec![], code)
}

fn one_insert() -> Value {
    changeset(vec![insert("tasks", "new-1", json!({"title": "new"}))])
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A token signed with `key` under `header`, for `claims`.
fn forged(header: Value, claims: Value, key: &SigningKey) -> String {
    format!(
        "Bearer {}",
        devkeys::sign_raw(&header.to_string(), &claims.to_string(), key)
    )
}

fn claims(user: &str) -> Value {
    let now = unix_now();
    json!({"sub": user, "iat": now, "exp": now + 900, "aud": "mana"})
}

/// Chunked transfer encoding of `body` in chunks of `chunk` bytes, with the final empty chunk.
fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 16 + 16);
    for piece in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn cases(user: &str) -> Vec<Case> {
    let kid = keys().kid.clone();
    let trusted = &keys().key;
    let stranger = SigningKey::from_bytes(&[42; 32]);
    let header = json!({"alg": "EdDSA", "kid": kid, "typ": "JWT"});
    let now = unix_now();
    let valid_change = insert("tasks", "x", json!({"title": "x"}));
    let with = |key: &str, value: Value| {
        let mut change = valid_change.clone();
        change[key] = value;
        change
    };
    let update_at = |at: Value| json!({"table": "tasks", "id": "x", "op": "update", "fields": {"title": {"value": "t", "at": at}}});
    let eleven_mb = 11 * 1024 * 1024;

    let mut cases = vec![
        // ---- malformed JSON ------------------------------------------------------------------------
        push_bytes(
            "json: trailing garbage",
            r#"{"changes":[]} x"#,
            400,
            "invalid_json",
        ),
        push_bytes(
            "json: single quotes",
            r#"{'changes':[]}"#,
            400,
            "invalid_json",
        ),
        push_bytes(
            "json: trailing comma",
            r#"{"changes":[],}"#,
            400,
            "invalid_json",
        ),
        push_bytes("json: NaN", r#"{"schemaVersion":NaN}"#, 400, "invalid_json"),
        push_bytes(
            "json: comment",
            "{/* hi */\"changes\":[]}",
            400,
            "invalid_json",
        ),
        push_bytes("json: unquoted key", "{changes:[]}", 400, "invalid_json"),
        push_bytes("json: only whitespace", "   \n\t ", 400, "invalid_json"),
        push_bytes(
            "json: byte order mark",
            [&b"\xEF\xBB\xBF"[..], br#"{"changes":[]}"#].concat(),
            400,
            "invalid_json",
        ),
        push_bytes(
            "json: lone surrogate escape",
            r#"{"changes":[{"table":"tasks","id":"x","op":"insert","data":{"t":"\ud800"}}]}"#,
            400,
            "invalid_json",
        ),
        push_bytes(
            "utf-8: invalid bytes inside a string",
            [
                &br#"{"changes":[{"table":"tasks","id":"x","op":"insert","data":{"t":""#[..],
                b"\xff\xfe\xc3\x28",
                br#""}}]}"#,
            ]
            .concat(),
            400,
            "invalid_json",
        ),
        push_bytes(
            "utf-8: overlong encoding of '/'",
            [&br#"{"clientId":""#[..], b"\xc0\xaf", br#""}"#].concat(),
            400,
            "invalid_json",
        ),
        push_bytes("utf-8: bare 0xff", b"\xff".to_vec(), 400, "invalid_json"),
        push_bytes(
            "nesting: 10,000 arrays in data",
            format!(
                r#"{{"changes":[{{"table":"tasks","id":"x","op":"insert","data":{{"deep":{}}}}}]}}"#,
                nested_arrays(10_000)
            ),
            400,
            "invalid_json",
        ),
        push_bytes(
            "nesting: 10,000 objects in actor",
            format!(
                r#"{{"changes":[{{"table":"tasks","id":"x","op":"insert","data":{{}},"actor":{}0{}}}]}}"#,
                r#"{"a":"#.repeat(10_000),
                "}".repeat(10_000)
            ),
            400,
            "invalid_json",
        ),
        // ---- the body is JSON but not a changeset ----------------------------------------------------
        push_bytes("body: array", "[]", 400, "invalid_body"),
        push_bytes("body: null", "null", 400, "invalid_body"),
        push_bytes("body: string", r#""changes""#, 400, "invalid_body"),
        push_json(
            "changes: object",
            json!({"changes": {"0": valid_change}}),
            "invalid_body",
        ),
        push_json("changes: string", json!({"changes": "[]"}), "invalid_body"),
        push_json(
            "clientId: number",
            json!({"clientId": 7, "changes": []}),
            "invalid_body",
        ),
        push_json(
            "clientId: control character",
            json!({"clientId": "dev\u{7}", "changes": [valid_change]}),
            "invalid_body",
        ),
        push_json(
            "clientId: U+0000",
            json!({"clientId": "dev\u{0}", "changes": [valid_change]}),
            "invalid_body",
        ),
        push_json(
            "since: number",
            json!({"since": 0, "changes": [valid_change]}),
            "invalid_since",
        ),
        push_json(
            "since: garbage",
            json!({"since": "yesterday", "changes": [valid_change]}),
            "invalid_since",
        ),
        push_json(
            "since: Feb 30",
            json!({"since": "2026-02-30T00:00:00.000Z", "changes": [valid_change]}),
            "invalid_since",
        ),
        push_json(
            "schemaVersion: string",
            json!({"schemaVersion": "1", "changes": [valid_change]}),
            "invalid_body",
        ),
        push_json(
            "schemaVersion: 2 (newer than supported)",
            json!({"schemaVersion": 2, "changes": [valid_change]}),
            "unsupported_schema_version",
        ),
        push_json(
            "schemaVersion: beyond i64",
            json!({"schemaVersion": 1e40, "changes": [valid_change]}),
            "invalid_body",
        ),
        // ---- one bad change after a good one -------------------------------------------------------
        bad_change("change: number", json!(1), "invalid_change"),
        bad_change("change: array", json!([valid_change]), "invalid_change"),
        bad_change("change: null", Value::Null, "invalid_change"),
        bad_change("table: number", with("table", json!(1)), "invalid_change"),
        bad_change(
            "table: missing",
            json!({"id": "x", "op": "insert", "data": {}}),
            "invalid_change",
        ),
        bad_change("table: empty", with("table", json!("")), "invalid_change"),
        bad_change(
            "table: 'a b'",
            with("table", json!("a b")),
            "invalid_change",
        ),
        bad_change(
            "table: 65 characters",
            with("table", json!("t".repeat(65))),
            "invalid_change",
        ),
        bad_change(
            "table: non-ASCII",
            with("table", json!("ä")),
            "invalid_change",
        ),
        bad_change(
            "table: path traversal",
            with("table", json!("../x")),
            "invalid_change",
        ),
        bad_change("id: number", with("id", json!(5)), "invalid_change"),
        bad_change("id: object", with("id", json!({"x": 1})), "invalid_change"),
        bad_change(
            "id: missing",
            json!({"table": "tasks", "op": "insert", "data": {}}),
            "invalid_change",
        ),
        bad_change("id: empty", with("id", json!("")), "invalid_change"),
        bad_change(
            "id: 10 KB",
            with("id", json!("i".repeat(10 * 1024))),
            "invalid_change",
        ),
        bad_change("id: U+0000", with("id", json!("a\u{0}b")), "invalid_body"),
        bad_change("id: newline", with("id", json!("a\nb")), "invalid_body"),
        bad_change("op: number", with("op", json!(1)), "invalid_change"),
        bad_change("op: array", with("op", json!(["insert"])), "invalid_change"),
        bad_change("op: unknown", with("op", json!("upsert")), "invalid_change"),
        bad_change(
            "op: wrong case",
            with("op", json!("INSERT")),
            "invalid_change",
        ),
        bad_change(
            "op: missing",
            json!({"table": "tasks", "id": "x", "data": {}}),
            "invalid_change",
        ),
        bad_change("data: array", with("data", json!([1, 2])), "invalid_change"),
        bad_change("data: string", with("data", json!("{}")), "invalid_change"),
        bad_change(
            "insert: neither data nor fields",
            json!({"table": "tasks", "id": "x", "op": "insert"}),
            "invalid_change",
        ),
        bad_change(
            "fields: array",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": [1]}),
            "invalid_change",
        ),
        bad_change(
            "fields: {k: null}",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": {"title": null}}),
            "invalid_change",
        ),
        bad_change(
            "fields: entry is a string",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": {"title": "t"}}),
            "invalid_change",
        ),
        bad_change(
            "update: empty fields and no data",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": {}}),
            "invalid_change",
        ),
        bad_change(
            "fields.at: number",
            update_at(json!(1_700_000_000)),
            "invalid_change",
        ),
        bad_change(
            "fields.at: garbage",
            update_at(json!("now")),
            "invalid_change",
        ),
        bad_change(
            "fields.at: month 13",
            update_at(json!("2026-13-01T00:00:00Z")),
            "invalid_change",
        ),
        bad_change(
            "fields.at: hour 24",
            update_at(json!("2026-01-01T24:00:00Z")),
            "invalid_change",
        ),
        bad_change(
            "fields.at: 65 characters",
            update_at(json!(format!("2026-01-01T00:00:00.{}Z", "0".repeat(44)))),
            "invalid_change",
        ),
        bad_change(
            "fields.updatedAt: object",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": {"title": {"value": 1, "updatedAt": {}}}}),
            "invalid_change",
        ),
        bad_change(
            "deletedAt: number",
            json!({"table": "tasks", "id": "x", "op": "delete", "deletedAt": 5}),
            "invalid_change",
        ),
        bad_change(
            "deletedAt: garbage",
            json!({"table": "tasks", "id": "x", "op": "delete", "deletedAt": "not a time"}),
            "invalid_change",
        ),
        bad_change(
            "spaceId: number",
            with("spaceId", json!(3)),
            "invalid_change",
        ),
        bad_change(
            "spaceId: object",
            with("spaceId", json!({"id": "s"})),
            "invalid_change",
        ),
        bad_change(
            "spaceId: U+0000",
            with("spaceId", json!("s\u{0}")),
            "invalid_change",
        ),
        bad_change("origin: number", with("origin", json!(1)), "invalid_change"),
        bad_change(
            "origin: array",
            with("origin", json!(["user"])),
            "invalid_change",
        ),
        bad_change(
            "origin: 600 bytes",
            with("origin", json!("o".repeat(600))),
            "invalid_change",
        ),
        bad_change(
            "origin: U+0000",
            with("origin", json!("us\u{0}er")),
            "invalid_change",
        ),
        bad_change(
            "schemaVersion: float",
            with("schemaVersion", json!(1.5)),
            "invalid_body",
        ),
        bad_change(
            "schemaVersion: bool",
            with("schemaVersion", json!(true)),
            "invalid_body",
        ),
        bad_change(
            "schemaVersion: 99 on the change",
            with("schemaVersion", json!(99)),
            "unsupported_schema_version",
        ),
        bad_change(
            "U+0000: key of data",
            with("data", json!({"ti\u{0}tle": 1})),
            "invalid_change",
        ),
        bad_change(
            "U+0000: nested value",
            with("data", json!({"a": [{"b": "\u{0}"}]})),
            "invalid_change",
        ),
        bad_change(
            "U+0000: actor",
            with("actor", json!({"name": "\u{0}"})),
            "invalid_change",
        ),
        bad_change(
            "U+0000: field name",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": {"a\u{0}": {"value": 1}}}),
            "invalid_change",
        ),
        bad_change(
            "U+0000: field value",
            json!({"table": "tasks", "id": "x", "op": "update", "fields": {"a": {"value": "\u{0}"}}}),
            "invalid_change",
        ),
        // ---- numbers PostgreSQL's numeric cannot hold (JSON can write them; serde_json keeps their text)
        bad_change(
            "number: 1e131072 in data",
            raw_json(r#"{"table":"tasks","id":"n","op":"insert","data":{"n":1e131072}}"#),
            "invalid_number",
        ),
        bad_change(
            "number: 1e-16384 in a field",
            raw_json(
                r#"{"table":"tasks","id":"n","op":"update","fields":{"n":{"value":1e-16384}}}"#,
            ),
            "invalid_number",
        ),
        bad_change(
            "number: 200,000 digits in actor",
            raw_json(&format!(
                r#"{{"table":"tasks","id":"n","op":"insert","data":{{}},"actor":{{"n":{}}}}}"#,
                "9".repeat(200_000)
            )),
            "invalid_number",
        ),
        bad_change(
            "number: exponent 1001, nested in data",
            raw_json(r#"{"table":"tasks","id":"n","op":"insert","data":{"a":[{"b":1E+1001}]}}"#),
            "invalid_number",
        ),
        // ---- body size and framing -----------------------------------------------------------------
        case(
            "size: 11 MB declared, nothing sent",
            Send::Raw {
                head: format!(
                    "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {{auth}}\r\n\
                     Content-Type: application/json\r\nContent-Length: {eleven_mb}"
                ),
                body: Vec::new(),
            },
            Expect::Json(413, "payload_too_large"),
        ),
        case(
            "size: chunked body over the cap midway",
            Send::Raw {
                head: "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                   Content-Type: application/json\r\nTransfer-Encoding: chunked"
                    .into(),
                body: chunked(
                    &[
                        &br#"{"changes":[{"table":"tasks","id":"big","op":"insert","data":{"s":""#
                            [..],
                        &vec![b'a'; eleven_mb],
                        br#""}}]}"#,
                    ]
                    .concat(),
                    256 * 1024,
                ),
            },
            Expect::Json(413, "payload_too_large"),
        ),
        case(
            "framing: Content-Length not a number",
            Send::Raw {
                head: "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                       Content-Type: application/json\r\nContent-Length: abc"
                    .into(),
                body: b"{}".to_vec(),
            },
            Expect::Parser(400),
        ),
        case(
            "framing: two different Content-Lengths (smuggling)",
            Send::Raw {
                head: "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                       Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 40"
                    .into(),
                body: b"{}".to_vec(),
            },
            Expect::Parser(400),
        ),
        case(
            "framing: malformed chunk size",
            Send::Raw {
                head: "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                       Content-Type: application/json\r\nTransfer-Encoding: chunked"
                    .into(),
                body: b"zz\r\n{}\r\n0\r\n\r\n".to_vec(),
            },
            Expect::Json(400, "body_read_failed"),
        ),
        case(
            "header: X-Client-Id with a control character",
            Send::Raw {
                head: "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                       Content-Type: application/json\r\nContent-Length: 2\r\nX-Client-Id: a\x01b"
                    .into(),
                body: b"{}".to_vec(),
            },
            Expect::Parser(400),
        ),
        // ---- content type ---------------------------------------------------------------------------
        push_with(
            "content-type: application/xml",
            Auth::Valid,
            vec![("content-type", "application/xml".into())],
            415,
            "unsupported_media_type",
        ),
        push_with(
            "content-type: application/jsonx",
            Auth::Valid,
            vec![("content-type", "application/jsonx".into())],
            415,
            "unsupported_media_type",
        ),
        push_with(
            "content-type: multipart",
            Auth::Valid,
            vec![("content-type", "multipart/form-data; boundary=x".into())],
            415,
            "unsupported_media_type",
        ),
        // ---- X-Client-Id ------------------------------------------------------------------------------
        push_with(
            "x-client-id: 10 KB",
            Auth::Valid,
            vec![("x-client-id", "d".repeat(10 * 1024))],
            400,
            "invalid_client_id",
        ),
        raw_push(
            "x-client-id: non-ASCII",
            "X-Client-Id: gerät",
            400,
            "invalid_client_id",
        ),
        // ---- tokens ----------------------------------------------------------------------------------
        push_with("token: absent", Auth::Missing, vec![], 401, "missing_token"),
        push_with(
            "token: empty bearer",
            Auth::Header("Bearer ".into()),
            vec![],
            401,
            "missing_token",
        ),
        push_with(
            "token: Basic scheme",
            Auth::Header("Basic dXNlcjpwYXNz".into()),
            vec![],
            401,
            "malformed_token",
        ),
        push_with(
            "token: garbage",
            Auth::Header("Bearer a.b".into()),
            vec![],
            401,
            "malformed_token",
        ),
        push_with(
            "token: 64 KB",
            Auth::Header(format!("Bearer {}", "a".repeat(64 * 1024))),
            vec![],
            401,
            "malformed_token",
        ),
        raw_push_unauthed(
            "token: non-ASCII header",
            "Authorization: Bearer tökén",
            401,
            "malformed_token",
        ),
        push_with(
            "token: expired an hour ago",
            Auth::Header(forged(
                header.clone(),
                json!({"sub": user, "exp": now - 3600, "aud": "mana"}),
                trusted,
            )),
            vec![],
            401,
            "token_expired",
        ),
        push_with(
            "token: forged with another ed25519 key under the trusted kid",
            Auth::Header(forged(header.clone(), claims(user), &stranger)),
            vec![],
            401,
            "bad_signature",
        ),
        push_with(
            "token: forged with another key under an unknown kid",
            Auth::Header(forged(
                json!({"alg": "EdDSA", "kid": "attacker"}),
                claims(user),
                &stranger,
            )),
            vec![],
            401,
            "unknown_key",
        ),
        push_with(
            "token: alg none",
            Auth::Header(forged(
                json!({"alg": "none", "kid": kid}),
                claims(user),
                trusted,
            )),
            vec![],
            401,
            "unsupported_algorithm",
        ),
        push_with(
            "token: HS256",
            Auth::Header(forged(
                json!({"alg": "HS256", "kid": kid}),
                claims(user),
                trusted,
            )),
            vec![],
            401,
            "unsupported_algorithm",
        ),
        push_with(
            "token: sub of 300 bytes",
            Auth::Header(forged(
                header.clone(),
                json!({"sub": "u".repeat(300), "exp": now + 900, "aud": "mana"}),
                trusted,
            )),
            vec![],
            401,
            "malformed_token",
        ),
        push_with(
            "token: sub with U+0000",
            Auth::Header(forged(
                header.clone(),
                json!({"sub": format!("{user}\u{0}"), "exp": now + 900, "aud": "mana"}),
                trusted,
            )),
            vec![],
            401,
            "malformed_token",
        ),
        push_with(
            "token: sub is a number",
            Auth::Header(forged(
                header.clone(),
                json!({"sub": 7, "exp": now + 900, "aud": "mana"}),
                trusted,
            )),
            vec![],
            401,
            "missing_subject",
        ),
        push_with(
            "token: exp is a string",
            Auth::Header(forged(
                header.clone(),
                json!({"sub": user, "exp": "never", "aud": "mana"}),
                trusted,
            )),
            vec![],
            401,
            "malformed_token",
        ),
        // ---- app id in the URL -------------------------------------------------------------------------
        case(
            "app id: non-ASCII",
            Send::Http {
                method: "POST",
                path: "/sync/%C3%A4".into(),
                auth: Auth::Valid,
                headers: vec![("content-type", "application/json".into())],
                body: Some(one_insert().to_string().into_bytes()),
            },
            Expect::Json(400, "invalid_app_id"),
        ),
        case(
            "app id: U+0000",
            Send::Http {
                method: "POST",
                path: "/sync/a%00b".into(),
                auth: Auth::Valid,
                headers: vec![("content-type", "application/json".into())],
                body: Some(one_insert().to_string().into_bytes()),
            },
            Expect::Json(400, "invalid_app_id"),
        ),
        get(
            "app id: 65 characters on pull",
            format!(
                "/sync/{}/pull?collection=tasks&since={}",
                "a".repeat(65),
                percent_encode(LOG_START)
            ),
            vec![],
            "invalid_app_id",
        ),
        get(
            "app id: `.` on pull",
            format!(
                "/sync/./pull?collection=tasks&since={}",
                percent_encode(LOG_START)
            ),
            vec![],
            "invalid_app_id",
        ),
        get(
            "app id: `..` on stream",
            "/sync/../stream".into(),
            vec![],
            "invalid_app_id",
        ),
        get(
            "app id: colon on stream",
            "/sync/to:do/stream".into(),
            vec![],
            "invalid_app_id",
        ),
        // ---- query strings ----------------------------------------------------------------------------
        pull_query("query: %zz", "collection=tasks&since=%zz", "invalid_query"),
        pull_query("query: truncated %", "collection=tasks%", "invalid_query"),
        pull_query(
            "query: invalid UTF-8 %ff",
            "collection=%ff%fe&since=x",
            "invalid_query",
        ),
        pull_query(
            "query: overlong UTF-8 %c0%af",
            "collection=tasks&since=%c0%af",
            "invalid_query",
        ),
        pull_query(
            "query: limit=-1",
            &format!(
                "collection=tasks&since={}&limit=-1",
                percent_encode(LOG_START)
            ),
            "invalid_limit",
        ),
        pull_query(
            "query: limit=0",
            &format!(
                "collection=tasks&since={}&limit=0",
                percent_encode(LOG_START)
            ),
            "invalid_limit",
        ),
        pull_query(
            "query: limit=1e3",
            &format!(
                "collection=tasks&since={}&limit=1e3",
                percent_encode(LOG_START)
            ),
            "invalid_limit",
        ),
        pull_query(
            "query: limit beyond u64",
            &format!(
                "collection=tasks&since={}&limit={}",
                percent_encode(LOG_START),
                "9".repeat(30)
            ),
            "invalid_limit",
        ),
        pull_query(
            "query: since of 10 KB",
            &format!("collection=tasks&since={}", "9".repeat(10 * 1024)),
            "invalid_since",
        ),
        pull_query(
            "query: since with U+0000",
            "collection=tasks&since=2026-01-01T00:00:00%00Z",
            "invalid_since",
        ),
        pull_query(
            "query: since without zone",
            "collection=tasks&since=2026-01-01T00:00:00.000",
            "invalid_since",
        ),
        pull_query(
            "query: collection 'a b'",
            &format!("collection=a%20b&since={}", percent_encode(LOG_START)),
            "invalid_collection",
        ),
        pull_query(
            "query: collection non-ASCII",
            &format!("collection=%C3%A4&since={}", percent_encode(LOG_START)),
            "invalid_collection",
        ),
        pull_query(
            "query: collection U+0000",
            &format!("collection=a%00&since={}", percent_encode(LOG_START)),
            "invalid_collection",
        ),
        pull_query("query: nothing but '&&&'", "&&&", "missing_parameter"),
        raw_get(
            "pull: X-Client-Id non-ASCII",
            &format!(
                "/sync/todo/pull?collection=tasks&since={}",
                percent_encode(LOG_START)
            ),
            "X-Client-Id: ü",
            "invalid_client_id",
        ),
        get(
            "stream: since=garbage",
            "/sync/todo/stream?since=garbage".into(),
            vec![],
            "invalid_since",
        ),
        get(
            "stream: bad collection",
            "/sync/todo/stream?collections=a%20b".into(),
            vec![],
            "invalid_query",
        ),
        get(
            "stream: 101 apps",
            format!(
                "/sync/stream?apps={}",
                (0..101)
                    .map(|i| format!("a{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            vec![],
            "invalid_query",
        ),
        get(
            "stream: Last-Event-ID garbage",
            "/sync/stream".into(),
            vec![("last-event-id", "42".into())],
            "invalid_last_event_id",
        ),
        raw_get(
            "stream: Last-Event-ID non-ASCII",
            "/sync/stream",
            "Last-Event-ID: ä",
            "invalid_last_event_id",
        ),
    ];
    // The same oversize refusal without Content-Length and without chunking is impossible in HTTP/1.1;
    // one more framing case: the declared length is a huge number.
    cases.push(case(
        "size: Content-Length of 2^63",
        Send::Raw {
            head: "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
                   Content-Type: application/json\r\nContent-Length: 9223372036854775808"
                .into(),
            body: Vec::new(),
        },
        Expect::Json(413, "payload_too_large"),
    ));
    cases
}

/// Whether `reply` is what `expect` says, without panicking (the matrix reports every failure at once).
fn check(reply: &Reply, expect: &Expect) -> Result<(), String> {
    let got = || {
        format!(
            "got {} {}",
            reply.status,
            reply.text.chars().take(300).collect::<String>()
        )
    };
    match *expect {
        Expect::Json(status, code) => {
            if reply.status != status || reply.body["error"] != json!(code) {
                return Err(format!("expected {status} {code}, {}", got()));
            }
            if reply.body["message"].as_str().is_none_or(str::is_empty) {
                return Err(format!("no message, {}", got()));
            }
            if reply.header("content-type") != Some("application/json") {
                return Err(format!("content type {:?}", reply.header("content-type")));
            }
        }
        Expect::Parser(status) => {
            if reply.status != status || !reply.body.is_null() {
                return Err(format!("expected a bare {status}, {}", got()));
            }
        }
    }
    Ok(())
}

async fn run(server: &TestServer, user: &str, bearer: &str, send: Send) -> Reply {
    match send {
        Send::Http {
            method,
            path,
            auth,
            headers,
            body,
        } => {
            let mut all: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let auth = match auth {
                Auth::Valid => Some(bearer.to_owned()),
                Auth::Missing => None,
                Auth::Header(value) => Some(value),
            };
            if let Some(auth) = &auth {
                all.push(("authorization", auth));
            }
            let _ = user;
            server.request(method, &path, &all, body).await
        }
        Send::Raw { head, body } => {
            raw_request(
                server.addr,
                head.replace("{auth}", bearer) + "\r\nConnection: close",
                body,
            )
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bad_input_matrix_is_refused_and_writes_nothing() {
    let server = TestServer::start().await;
    let user = unique_user("bad-input");
    let bearer = format!("Bearer {}", token(&user));
    // Some rows already there, so "unchanged" is not the trivial zero.
    let seed = changeset(
        (0..3)
            .map(|i| insert("tasks", &format!("seed-{i}"), json!({"n": i})))
            .collect(),
    );
    let reply = server.push(&user, "todo", Some("seed"), &seed).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let rows = count_rows(&user).await;
    assert_eq!(rows, 3);

    let cases = cases(&user);
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for Case { name, send, expect } in cases {
        let reply = run(&server, &user, &bearer, send).await;
        if let Err(why) = check(&reply, &expect) {
            failures.push(format!("{name}: {why}"));
        }
        let after = count_rows(&user).await;
        if after != rows {
            failures.push(format!("{name}: rows {rows} -> {after}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The server is still fine: the same user pushes and pulls normally.
    let reply = server
        .push(&user, "todo", Some("seed"), &one_insert())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(count_rows(&user).await, rows + 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nine_megabyte_string_value_is_not_bad_input() {
    let server = TestServer::start().await;
    let user = unique_user("bad-9mb");
    let big = "b".repeat(9 * 1024 * 1024);
    let body = changeset(vec![insert("notes", "n1", json!({"body": big}))]);
    let reply = server.push(&user, "todo", Some("dev-a"), &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(count_rows(&user).await, 1);
    let reply = server
        .pull(&user, "todo", Some("dev-b"), "notes", LOG_START, None)
        .await;
    reply.assert_status(200);
    assert_eq!(
        reply.changes()[0]["data"]["body"].as_str().map(str::len),
        Some(big.len())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_is_opaque_any_json_is_accepted_and_returned() {
    let server = TestServer::start().await;
    let user = unique_user("bad-actor");
    let actors = [
        json!(5),
        json!("agent"),
        json!([1, "two", {"three": 3}]),
        json!(true),
        json!({"kind": "agent", "nested": {"deep": [null, 1.5, -2]}}),
        json!(null),
    ];
    let changes = actors
        .iter()
        .enumerate()
        .map(|(i, actor)| {
            let mut change = insert("tasks", &format!("a{i}"), json!({"i": i}));
            change["actor"] = actor.clone();
            change
        })
        .collect();
    let reply = server
        .push(&user, "todo", Some("dev-a"), &changeset(changes))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let reply = server
        .pull(&user, "todo", Some("dev-b"), "tasks", LOG_START, None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for (i, actor) in actors.iter().enumerate() {
        let change = reply
            .changes()
            .iter()
            .find(|c| c["id"] == json!(format!("a{i}")))
            .unwrap_or_else(|| panic!("a{i} missing: {}", reply.text));
        assert_eq!(&change["actor"], actor, "actor {i}");
    }
    server.stop().await;
}

fn tiny_changes(n: usize) -> Value {
    let changes: Vec<Value> = (0..n)
        .map(|i| json!({"table": "t", "id": format!("r{i}"), "op": "insert", "data": {}}))
        .collect();
    json!({"since": LOG_START, "changes": changes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tiny_changes_in_one_batch_are_accepted() {
    let server = TestServer::start().await;
    let user = unique_user("bad-10k");
    let body = tiny_changes(10_000);
    let reply = server.push(&user, "todo", Some("dev-a"), &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(count_rows(&user).await, 10_000);
    server.stop().await;
}

/// 100,000 changes of ~55 bytes each are ~5.5 MB, under the 10 MB cap. Measured outcome: the whole batch
/// is accepted in one transaction (a few seconds); the test asserts exactly that, all or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_tiny_changes_under_the_cap_are_all_or_nothing() {
    let server = TestServer::start().await;
    let user = unique_user("bad-100k");
    let body = tiny_changes(100_000);
    assert!(body.to_string().len() < 10 * 1024 * 1024);
    let started = std::time::Instant::now();
    let reply = server.push(&user, "todo", Some("dev-a"), &body).await;
    let rows = count_rows(&user).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(rows, 100_000, "after {:?}", started.elapsed());
    server.stop().await;
}

// ---- WebSockets ------------------------------------------------------------------------------------------

enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

fn text(value: Value) -> Frame {
    Frame::Text(value.to_string())
}

struct WsCase {
    name: &'static str,
    /// Authenticate first (as the case user) before sending `frames`.
    authed: bool,
    frames: Vec<Frame>,
    /// The close code the server must end with.
    close: u16,
}

/// Reads until the socket closes; returns the close code (0 = ended without a close frame) and how many
/// error messages came first.
async fn until_closed(socket: &mut support::Socket) -> (u16, usize) {
    let mut errors = 0;
    for _ in 0..1000 {
        match next_frame(socket, WAIT).await {
            Received::Json(message) if message["type"] == json!("error") => errors += 1,
            Received::Json(_) => {}
            Received::Closed { code, .. } => return (code, errors),
            Received::Ended => return (0, errors),
            Received::Nothing => panic!("the socket stayed open"),
        }
    }
    panic!("the socket never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_abuse_is_closed_with_the_right_code() {
    let server = TestServer::start().await;
    let user = unique_user("bad-ws");
    let other = unique_user("bad-ws-other");
    let stranger = SigningKey::from_bytes(&[43; 32]);
    let forged_token = devkeys::sign_raw(
        &json!({"alg": "EdDSA", "kid": keys().kid}).to_string(),
        &claims(&user).to_string(),
        &stranger,
    );
    let over = 16 * 1024 + 1;
    let cases = vec![
        WsCase {
            name: "garbage text before auth",
            authed: false,
            frames: vec![Frame::Text("hello".into())],
            close: 1008,
        },
        WsCase {
            name: "empty object before auth",
            authed: false,
            frames: vec![text(json!({}))],
            close: 1008,
        },
        WsCase {
            name: "type is a number",
            authed: false,
            frames: vec![text(json!({"type": 5}))],
            close: 1008,
        },
        WsCase {
            name: "auth: token is a number",
            authed: false,
            frames: vec![text(json!({"type": "auth", "token": 5}))],
            close: 1008,
        },
        WsCase {
            name: "auth: token null",
            authed: false,
            frames: vec![text(json!({"type": "auth", "token": null}))],
            close: 1008,
        },
        WsCase {
            name: "auth: token empty",
            authed: false,
            frames: vec![text(json!({"type": "auth", "token": ""}))],
            close: 1008,
        },
        WsCase {
            name: "auth: clientId is a number",
            authed: false,
            frames: vec![text(
                json!({"type": "auth", "token": token(&user), "clientId": 5}),
            )],
            close: 1008,
        },
        WsCase {
            name: "auth: clientId of 600 bytes",
            authed: false,
            frames: vec![text(
                json!({"type": "auth", "token": token(&user), "clientId": "c".repeat(600)}),
            )],
            close: 1008,
        },
        WsCase {
            name: "auth: clientId with a control character",
            authed: false,
            frames: vec![text(
                json!({"type": "auth", "token": token(&user), "clientId": "a\u{1}"}),
            )],
            close: 1008,
        },
        WsCase {
            name: "auth: forged with another key",
            authed: false,
            frames: vec![text(json!({"type": "auth", "token": forged_token}))],
            close: 1008,
        },
        WsCase {
            name: "oversized text before auth",
            authed: false,
            frames: vec![Frame::Text("x".repeat(over))],
            close: 1009,
        },
        WsCase {
            name: "oversized binary before auth",
            authed: false,
            frames: vec![Frame::Binary(vec![0; over])],
            close: 1009,
        },
        WsCase {
            name: "binary after auth",
            authed: true,
            frames: vec![Frame::Binary(vec![1, 2, 3])],
            close: 1003,
        },
        WsCase {
            name: "16 KiB + 1 after auth",
            authed: true,
            frames: vec![text(json!({"type": "ping", "pad": "p".repeat(over)}))],
            close: 1009,
        },
        WsCase {
            name: "re-auth as another user",
            authed: true,
            frames: vec![text(json!({"type": "auth", "token": token(&other)}))],
            close: 1008,
        },
        WsCase {
            name: "re-auth with a forged token",
            authed: true,
            frames: vec![text(
                json!({"type": "auth", "token": devkeys::sign_raw(&json!({"alg": "EdDSA", "kid": keys().kid}).to_string(), &claims(&user).to_string(), &stranger)}),
            )],
            close: 1008,
        },
        WsCase {
            name: "a flood of garbage after auth hits the rate limit",
            authed: true,
            frames: (0..100)
                .map(|i| Frame::Text(format!("garbage {i}")))
                .collect(),
            close: 1008,
        },
    ];
    for case in cases {
        let mut socket = if case.authed {
            server.authed_socket("/ws", &user, None).await
        } else {
            server.socket("/ws").await
        };
        for frame in case.frames {
            let message = match frame {
                Frame::Text(text) => Message::text(text),
                Frame::Binary(bytes) => Message::binary(bytes),
            };
            if socket.send(message).await.is_err() {
                break; // the server already closed
            }
        }
        let (code, _errors) = until_closed(&mut socket).await;
        // tungstenite may drop a connection outright when the frame exceeds its limits.
        let ok = code == case.close || (case.close == 1009 && code == 0);
        assert!(
            ok,
            "{}: closed with {code}, expected {}",
            case.name, case.close
        );
    }
    server.stop().await;
}

/// Malformed messages after auth that are not abuse are answered with an error and the socket stays
/// usable; a frame of exactly the cap is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bad_messages_after_auth_are_errors_not_closes() {
    let server = TestServer::start().await;
    let user = unique_user("bad-ws-soft");
    let mut socket = server.authed_socket("/ws/todo", &user, None).await;
    // The legacy socket's nudge after auth.
    assert!(
        matches!(next_frame(&mut socket, WAIT).await, Received::Json(m) if m["type"] == json!("sync-available"))
    );
    for message in [
        json!({"type": "auth", "token": 5}),
        json!({"type": "auth"}),
        json!({"type": "subscribe", "apps": ["x"]}),
        json!([1, 2]),
    ] {
        send_json(&mut socket, &message).await;
        match next_frame(&mut socket, WAIT).await {
            Received::Json(reply) => {
                assert_eq!(reply["type"], json!("error"), "{message}: {reply}")
            }
            other => panic!("{message}: {other:?}"),
        }
    }
    // Exactly 16 KiB is still a message.
    let skeleton = json!({"type": "ping", "pad": ""}).to_string().len();
    let padded = json!({"type": "ping", "pad": "p".repeat(16 * 1024 - skeleton)}).to_string();
    assert_eq!(padded.len(), 16 * 1024);
    socket.send(Message::text(padded)).await.unwrap();
    assert_eq!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(json!({"type": "pong"}))
    );
    server.stop().await;
}

/// Behind the parser's own check: any value PostgreSQL refuses (SQLSTATE class 22) is the client's fault,
/// not a 500, and the batch is written not at all. The store is driven directly with a batch the parser
/// would have refused, the way a future gap in the parser would let one through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_database_refuses_is_a_client_error_and_writes_nothing() {
    use mana_sync::protocol::Changeset;
    let server = TestServer::start().await;
    let user = unique_user("refused-value");
    let batch = Changeset::new(
        None,
        mana_sync::protocol::time::parse_rfc3339(LOG_START).unwrap(),
        vec![
            support::parsed_insert("fine", json!({"title": "ok"})),
            support::parsed_insert("huge", serde_json::from_str(r#"{"n": 1e131072}"#).unwrap()),
        ],
    );
    let error = server
        .shared
        .store
        .push(&user, "todo", Some("dev"), &batch, 100, None)
        .await
        .expect_err("PostgreSQL cannot store 1e131072");
    assert!(
        matches!(error, mana_sync::store::StoreError::Rejected(_)),
        "{error:?}"
    );
    let api = mana_sync::http::error::ApiError::from(error);
    assert_eq!(
        (api.status.as_u16(), api.code),
        (400, "invalid_value"),
        "{}",
        api.message
    );
    assert_eq!(support::count_rows(&user).await, 0);
    // The connection it used is fine for the next request.
    let reply = server
        .push(
            &user,
            "todo",
            Some("dev"),
            &changeset(vec![insert("tasks", "t", json!({}))]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;
}
