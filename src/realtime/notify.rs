//! Fan-out across server instances through PostgreSQL `LISTEN`/`NOTIFY`.
//!
//! A push queues a small hint (`{"i":instance,"u":user,"a":app,"t":[tables],"c":device,"s":stamp}`) with
//! `pg_notify` inside its own transaction, so PostgreSQL delivers it to every listening instance exactly
//! when the change commits, never for a rolled-back one. Direct writers get the same hint from the schema's
//! statement trigger. `s` is the user's clock after the commit (the newest stamp written): it raises what
//! the store knows of the user's clock (`store::KnownStamps`) before any local connection hears of the
//! change. Each instance keeps one dedicated listening connection and feeds hints into its local hub; hints
//! from its own instance id are not relayed to the hub, because the push already notified it.
//!
//! Hints can be lost while the listening connection is down. So the store's memory is switched off while it
//! is down, and after it comes back every local connection is told to pull everything
//! (`Hub::resync_all`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::hub::MAX_HINT_TABLES;
use super::Context;
use crate::log;
use crate::protocol::time::{self, Micros};

pub const CHANNEL: &str = "mana_sync_changes";
/// The listening connection's `application_name`, as `pg_stat_activity` shows it.
pub const LISTENER_NAME: &str = "mana-sync listener";

/// PostgreSQL refuses payloads of 8,000 bytes or more; above this the table list is dropped.
const MAX_PAYLOAD: usize = 7_900;

/// The hint a push sends to other instances; `stamp` is the user's clock after the push.
pub fn hint_payload(
    instance: &str,
    user: &str,
    app: &str,
    tables: &BTreeSet<String>,
    device: Option<&str>,
    stamp: Micros,
) -> String {
    let stamp = time::format_cursor(stamp);
    let app_changed = || json!({"i": instance, "u": user, "a": app, "c": device, "s": stamp});
    if tables.len() > MAX_HINT_TABLES {
        return app_changed().to_string();
    }
    let payload = json!({"i": instance, "u": user, "a": app, "t": tables, "c": device, "s": stamp})
        .to_string();
    if payload.len() <= MAX_PAYLOAD {
        payload
    } else {
        app_changed().to_string()
    }
}

/// A hint as received from the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHint {
    pub instance: Option<String>,
    pub user: String,
    pub app: String,
    pub tables: Option<BTreeSet<String>>,
    /// The device that pushed (`c`), whose own connections are not told.
    pub device: Option<String>,
    /// The user's clock after the commit; `None` from servers that did not send it.
    pub stamp: Option<Micros>,
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
        device: text("c"),
        stamp: value
            .get("s")
            .and_then(Value::as_str)
            .and_then(|s| time::parse_rfc3339(s).ok()),
    })
}

/// Keeps a `LISTEN` connection open until shutdown, reconnecting with back-off.
pub async fn listener(context: Arc<dyn Context>) {
    let shutdown = context.shutdown().clone();
    let mut connected_before = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut established = false;
        let error = tokio::select! {
            error = listen_once(&*context, connected_before, &mut established) => error,
            () = shutdown.cancelled() => return,
        };
        log::warn(
            "notification listener lost its connection",
            &[("error", error.into())],
        );
        // A connection that was up retries at once-ish: the store answers nothing from memory meanwhile.
        if established {
            backoff = Duration::from_millis(100);
        }
        connected_before = true;
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One listening connection, until it fails; returns why. Sets `established` once `LISTEN` is in effect.
async fn listen_once(context: &dyn Context, resync: bool, established: &mut bool) -> String {
    match listen_on_connection(context, resync, established).await {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

async fn listen_on_connection(
    context: &dyn Context,
    resync: bool,
    established: &mut bool,
) -> Result<std::convert::Infallible, String> {
    let mut listener = context
        .store()
        .listener(LISTENER_NAME)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let result = async {
        listener.listen(CHANNEL).await.map_err(|e| format!("LISTEN: {e}"))?;
        // From here on every commit's hint arrives: the store may answer from memory again.
        *established = true;
        context.store().known().listener_up();
        if resync {
            log::info("notification listener reconnected: asking every connection to pull", &[]);
            context.hub().resync_all();
        }
        let mut health = tokio::time::interval(Duration::from_secs(15));
        health.tick().await;
        loop {
            tokio::select! {
                hint = listener.next() => match hint {
                    Some(payload) => deliver(context, &payload),
                    None => return Err("connection closed".to_owned()),
                },
                request = context.store().known().catch_up_requested() => {
                    // PostgreSQL sends every notification committed before this query ahead of its answer,
                    // and the listener queues them in order: once the answer is here they are all queued.
                    match tokio::time::timeout(Duration::from_secs(5), listener.round_trip()).await {
                        Ok(Ok(_)) => {}
                        _ => return Err("catch-up round trip failed".to_owned()),
                    }
                    while let Some(payload) = listener.try_next() {
                        deliver(context, &payload);
                    }
                    context.store().known().caught_up_to(request);
                }
                _ = health.tick() => {
                    // A silently dead connection would never report; ask it something now and then.
                    match tokio::time::timeout(Duration::from_secs(5), listener.check()).await {
                        Ok(Ok(_)) => {}
                        _ => return Err("health check failed".to_owned()),
                    }
                }
            }
        }
    }
    .await;
    // Hints may be lost from now until the next LISTEN: the store's memory must not answer meanwhile.
    context.store().known().listener_down();
    drop(listener);
    result
}

fn deliver(context: &dyn Context, payload: &str) {
    let Some(hint) = parse_hint(payload) else {
        log::warn("ignoring a malformed notification", &[]);
        return;
    };
    // Before any connection hears of the change, so none of them can pull the old "nothing new".
    match hint.stamp {
        Some(stamp) => context.store().known().observe(&hint.user, stamp),
        None => context.store().known().forget(&hint.user),
    }
    if hint.instance.as_deref() == Some(context.instance_id()) {
        return;
    }
    context.hub().notify(
        &hint.user,
        &hint.app,
        hint.tables.as_ref(),
        hint.device.as_deref(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_stay_under_the_payload_limit() {
        let tables: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let stamp = 1_795_255_500_123_456;
        let payload = hint_payload("inst", "u", "todo", &tables, Some("dev"), stamp);
        assert_eq!(
            parse_hint(&payload),
            Some(RemoteHint {
                instance: Some("inst".into()),
                user: "u".into(),
                app: "todo".into(),
                tables: Some(tables),
                device: Some("dev".into()),
                stamp: Some(stamp),
            })
        );
        let many: BTreeSet<String> = (0..500)
            .map(|i| format!("table_with_a_long_name_{i:04}"))
            .collect();
        let payload = hint_payload("inst", "u", "todo", &many, None, stamp);
        assert!(payload.len() <= MAX_PAYLOAD);
        assert_eq!(parse_hint(&payload).unwrap().tables, None);
        // More tables than a hint may name, however short: "the app changed".
        let short: BTreeSet<String> = (0..=MAX_HINT_TABLES).map(|i| format!("t{i}")).collect();
        let payload = hint_payload("inst", "u", "todo", &short, None, stamp);
        assert_eq!(parse_hint(&payload).unwrap().tables, None);
        assert_eq!(parse_hint(&payload).unwrap().stamp, Some(stamp));
        // The trigger's form for direct writers: no instance.
        let direct = parse_hint(
            r#"{"u":"u","a":"todo","c":"mcp-server","t":["tasks"],"s":"2026-11-21T10:05:00.123456Z"}"#,
        )
        .unwrap();
        assert_eq!(direct.instance, None);
        assert_eq!(
            direct.stamp,
            Some(time::parse_rfc3339("2026-11-21T10:05:00.123456Z").unwrap())
        );
        let old = parse_hint(r#"{"u":"u","a":"todo","c":"mcp-server","t":["tasks"]}"#).unwrap();
        assert_eq!(old.stamp, None);
        assert_eq!(parse_hint("{}"), None);
        assert_eq!(parse_hint("garbage"), None);
    }
}
