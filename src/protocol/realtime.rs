//! Real-time wire format: WebSocket messages and the stream (SSE) parameters. Pure; fuzzed.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use super::query::parse_query;
use super::time::{self, Micros};
use super::{is_identifier, ErrorCode, ProtocolError};

/// Largest client message accepted on a WebSocket, in bytes.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 16 * 1024;

/// What a client may send on a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Auth {
        token: String,
        client_id: Option<String>,
    },
    Ping,
}

pub fn parse_client_message(text: &str) -> Result<ClientMessage, String> {
    if text.len() > MAX_CLIENT_MESSAGE_BYTES {
        return Err(format!(
            "message larger than {MAX_CLIENT_MESSAGE_BYTES} bytes"
        ));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|_| "message is not valid JSON".to_owned())?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or("message has no \"type\"")?;
    match kind {
        "ping" => Ok(ClientMessage::Ping),
        "auth" => {
            let token = value
                .get("token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or("auth needs a token")?;
            let client_id = match value.get("clientId") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) if id.len() <= 512 && !id.chars().any(char::is_control) => {
                    Some(id.clone()).filter(|id| !id.is_empty())
                }
                Some(_) => return Err("clientId must be a short string".into()),
            };
            Ok(ClientMessage::Auth {
                token: token.to_owned(),
                client_id,
            })
        }
        other => Err(format!("unknown message type {:?}", truncate(other, 32))),
    }
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// What the server sends on a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(crate) enum ServerMessage {
    AuthOk,
    #[serde(rename_all = "camelCase")]
    SyncAvailable {
        app_id: String,
        tables: Vec<String>,
    },
    Pong,
    Error {
        message: String,
    },
}

impl ServerMessage {
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }
}

/// Parameters of `GET /sync/{appId}/stream` and `GET /sync/stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamQuery {
    /// Collections (per-app stream) or apps (unified stream); `None` = all.
    pub names: Option<BTreeSet<String>>,
    pub since: Micros,
}

/// Parses a stream query. `list` names the list parameter (`collections` or `apps`). `last_event_id`, when
/// present, wins over `since` (SPEC §7).
pub fn parse_stream_query(
    query: Option<&str>,
    list: &str,
    last_event_id: Option<&str>,
) -> Result<StreamQuery, ProtocolError> {
    let pairs = parse_query(query.unwrap_or(""))?;
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let names = match first(list) {
        None | Some("") => None,
        Some(text) => {
            let names: BTreeSet<String> = text
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            if names.len() > 100 {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidQuery,
                    format!("{list} lists more than 100 names"),
                ));
            }
            if let Some(bad) = names.iter().find(|n| !is_identifier(n)) {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidQuery,
                    format!(
                        "{list} entry {:?} must be 1-64 characters of A-Z a-z 0-9 _ . -",
                        truncate(bad, 80)
                    ),
                ));
            }
            Some(names)
        }
    };
    let since = match last_event_id.map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) => parse_event_id(id)?,
        None => match first("since") {
            None | Some("") => time::EPOCH,
            Some(s) => time::parse_rfc3339(s).map_err(|e| {
                ProtocolError::new(
                    ErrorCode::InvalidSince,
                    format!("since {:?} is not a valid cursor: {e}", truncate(s, 80)),
                )
            })?,
        },
    };
    Ok(StreamQuery { names, since })
}

/// An SSE event id is the cursor up to which the stream had delivered everything.
pub fn parse_event_id(id: &str) -> Result<Micros, ProtocolError> {
    time::parse_rfc3339(id).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidLastEventId,
            format!("Last-Event-ID {:?} is not a cursor: {e}", truncate(id, 80)),
        )
    })
}

/// One SSE `changes` event: `event: changes`, optional `id:`, one `data:` line, blank line; LF only.
pub(crate) fn sse_event(event: &str, id: Option<&str>, data: &str) -> String {
    debug_assert!(!data.contains('\n'), "compact JSON has no newlines");
    let mut out = String::with_capacity(data.len() + 48);
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages() {
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"auth","token":"t","clientId":"d","extra":1}"#),
            Ok(ClientMessage::Auth {
                token: "t".into(),
                client_id: Some("d".into())
            })
        );
        assert_eq!(
            parse_client_message(r#"{"type":"auth","token":"t"}"#),
            Ok(ClientMessage::Auth {
                token: "t".into(),
                client_id: None
            })
        );
        for bad in [
            "",
            "nope",
            "[]",
            "{}",
            r#"{"type":5}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"auth","token":""}"#,
            r#"{"type":"auth","token":"t","clientId":7}"#,
            r#"{"type":"subscribe"}"#,
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad}");
        }
        assert!(parse_client_message(&format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(20_000)
        ))
        .is_err());
    }

    #[test]
    fn server_messages_are_compact_and_typed() {
        assert_eq!(ServerMessage::AuthOk.to_json(), r#"{"type":"auth-ok"}"#);
        assert_eq!(ServerMessage::Pong.to_json(), r#"{"type":"pong"}"#);
        assert_eq!(
            ServerMessage::SyncAvailable {
                app_id: "todo".into(),
                tables: vec!["tasks".into()]
            }
            .to_json(),
            r#"{"type":"sync-available","appId":"todo","tables":["tasks"]}"#
        );
        assert_eq!(
            ServerMessage::Error {
                message: "no".into()
            }
            .to_json(),
            r#"{"type":"error","message":"no"}"#
        );
    }

    #[test]
    fn stream_queries() {
        let q = parse_stream_query(
            Some("collections=tasks,lists&since=2026-11-21T10%3A05%3A00Z"),
            "collections",
            None,
        )
        .unwrap();
        assert_eq!(
            q.names,
            Some(["lists".to_string(), "tasks".to_string()].into())
        );
        assert_eq!(q.since, 1_795_255_500_000_000);
        assert_eq!(
            parse_stream_query(None, "apps", None).unwrap(),
            StreamQuery {
                names: None,
                since: 0
            }
        );
        let resumed = parse_stream_query(
            Some("since=2020-01-01T00:00:00Z"),
            "apps",
            Some("2026-11-21T10:05:00.000000Z"),
        )
        .unwrap();
        assert_eq!(
            resumed.since, 1_795_255_500_000_000,
            "Last-Event-ID wins over since"
        );
        assert_eq!(
            parse_stream_query(Some("apps=a,b%2F"), "apps", None)
                .unwrap_err()
                .code,
            "invalid_query"
        );
        assert_eq!(
            parse_stream_query(Some("since=x"), "apps", None)
                .unwrap_err()
                .code,
            "invalid_since"
        );
        assert_eq!(
            parse_stream_query(None, "apps", Some("garbage"))
                .unwrap_err()
                .code,
            "invalid_last_event_id"
        );
    }

    #[test]
    fn sse_lines() {
        assert_eq!(
            sse_event("changes", Some("c1"), "{}"),
            "event: changes\nid: c1\ndata: {}\n\n"
        );
        assert_eq!(
            sse_event("heartbeat", None, "{}"),
            "event: heartbeat\ndata: {}\n\n"
        );
    }
}
