//! Fan-out across server instances through PostgreSQL `LISTEN`/`NOTIFY`.
//!
//! A push queues a small hint (`{"i":instance,"u":user,"a":app,"t":[tables],"c":client}`) with
//! `pg_notify` inside its own transaction, so PostgreSQL delivers it to every listening instance exactly
//! when the change commits, never for a rolled-back one. Direct writers get the same hint from the schema's
//! statement trigger. Each instance keeps one dedicated listening connection and feeds hints into its local
//! hub; hints from its own instance id are skipped, because the push already notified the local hub.
//!
//! Hints can be lost while the listening connection is down. So after it comes back, every local
//! connection is told to pull everything (`Hub::resync_all`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::app::App;
use crate::log;

pub const CHANNEL: &str = "mana_sync_changes";

/// PostgreSQL refuses payloads of 8,000 bytes or more; above this the table list is dropped.
const MAX_PAYLOAD: usize = 7_900;

/// The hint a push sends to other instances.
pub fn hint_payload(
    instance: &str,
    user: &str,
    app: &str,
    tables: &BTreeSet<String>,
    client: Option<&str>,
) -> String {
    let payload = json!({"i": instance, "u": user, "a": app, "t": tables, "c": client}).to_string();
    if payload.len() <= MAX_PAYLOAD {
        payload
    } else {
        json!({"i": instance, "u": user, "a": app, "c": client}).to_string()
    }
}

/// A hint as received from the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHint {
    pub instance: Option<String>,
    pub user: String,
    pub app: String,
    pub tables: Option<BTreeSet<String>>,
    pub client: Option<String>,
}

pub fn parse_hint(payload: &str) -> Option<RemoteHint> {
    let value: Value = serde_json::from_str(payload).ok()?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let tables = value.get("t").and_then(Value::as_array).map(|tables| {
        tables
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    });
    Some(RemoteHint {
        instance: text("i"),
        user: text("u")?,
        app: text("a")?,
        tables,
        client: text("c"),
    })
}

/// Keeps a `LISTEN` connection open for the life of the server, reconnecting with back-off.
pub fn spawn_listener(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = app.shutdown.subscribe();
        let mut connected_before = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                outcome = listen_once(&app, connected_before) => outcome,
                _ = shutdown.changed() => return,
            };
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => log::warn(
                    "notification listener lost its connection",
                    &[("error", error.into())],
                ),
            }
            connected_before = true;
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One listening connection, until it fails. Returns `Ok` if it ended after having been established.
async fn listen_once(app: &App, resync: bool) -> Result<(), String> {
    let (client, mut connection) = app
        .store
        .connect_dedicated()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, mut hints) = mpsc::unbounded_channel::<String>();
    // The connection object must be polled for the client to make progress; it also yields notifications.
    let pump = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if sender.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| format!("LISTEN: {e}"))?;
        if resync {
            log::info("notification listener reconnected: asking every connection to pull", &[]);
            app.hub.resync_all();
        }
        let mut health = tokio::time::interval(Duration::from_secs(15));
        health.tick().await;
        loop {
            tokio::select! {
                hint = hints.recv() => match hint {
                    Some(payload) => deliver(app, &payload),
                    None => return Err("connection closed".to_owned()),
                },
                _ = health.tick() => {
                    // A silently dead connection would never report; ask it something now and then.
                    match tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        _ => return Err("health check failed".to_owned()),
                    }
                }
            }
        }
    }
    .await;
    pump.abort();
    result
}

fn deliver(app: &App, payload: &str) {
    let Some(hint) = parse_hint(payload) else {
        log::warn("ignoring a malformed notification", &[]);
        return;
    };
    if hint.instance.as_deref() == Some(app.instance_id.as_str()) {
        return;
    }
    app.hub.notify(
        &hint.user,
        &hint.app,
        hint.tables.as_ref(),
        hint.client.as_deref(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_stay_under_the_payload_limit() {
        let tables: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let payload = hint_payload("inst", "u", "todo", &tables, Some("dev"));
        assert_eq!(
            parse_hint(&payload),
            Some(RemoteHint {
                instance: Some("inst".into()),
                user: "u".into(),
                app: "todo".into(),
                tables: Some(tables),
                client: Some("dev".into())
            })
        );
        let many: BTreeSet<String> = (0..500)
            .map(|i| format!("table_with_a_long_name_{i:04}"))
            .collect();
        let payload = hint_payload("inst", "u", "todo", &many, None);
        assert!(payload.len() <= MAX_PAYLOAD);
        assert_eq!(parse_hint(&payload).unwrap().tables, None);
        // The trigger's form for direct writers: no instance.
        let direct = parse_hint(r#"{"u":"u","a":"todo","c":"mcp-server","t":["tasks"]}"#).unwrap();
        assert_eq!(direct.instance, None);
        assert_eq!(parse_hint("{}"), None);
        assert_eq!(parse_hint("garbage"), None);
    }
}
