//! Server-Sent Events: `GET /sync/{appId}/stream` (one app) and `GET /sync/stream` (many apps, one
//! connection: browsers allow only six HTTP/1.1 connections per origin).
//!
//! A stream first delivers the whole backlog since its cursor, page after page, then waits for the hub's
//! hints and delivers what is new, with a heartbeat every 30 s. It reads through the same store query as a
//! pull, under the same per-user lock, so it never skips a change a pull would have returned. Events of the
//! unified stream carry an `id:` — the cursor up to which every listed app has been delivered — so a client
//! can resume with `Last-Event-ID` without a gap.
//!
//! A stream cannot be re-authenticated: it ends when its token expires (plus `WS_TOKEN_LEEWAY_SECS`, as a
//! WebSocket closes with 4001), with a last `token-expired` event; the client reconnects with a fresh token
//! and resumes from its cursor.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{self, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use serde_json::json;
use tokio::sync::mpsc;

use super::hub::{Evicted, Hint, Interest, Kind, Registration};
use super::{Context, Refusal};
use crate::log;
use crate::protocol::realtime::{parse_stream_query, sse_event};
use crate::protocol::time::{self, format_cursor, Micros};
use crate::protocol::{ErrorCode, WireChange};
use crate::store::StoreError;

/// Which stream a request opened.
pub(crate) enum Scope {
    /// One app; `collections` limits the tables.
    App(String),
    /// Several apps (`apps=`; all of the user's apps when absent).
    Unified,
}

pub(crate) async fn open(
    context: Arc<dyn Context>,
    request: Request<Incoming>,
    scope: Scope,
    user: String,
    device: Option<String>,
    expires: tokio::time::Instant,
) -> Result<Response<EventStream>, Refusal> {
    let last_event_id = match request.headers().get("last-event-id") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| Refusal::InvalidLastEventId)?),
    };
    let list = match scope {
        Scope::App(_) => "collections",
        Scope::Unified => "apps",
    };
    let query = parse_stream_query(request.uri().query(), list, last_event_id)?;
    let (interest, cursors, tables, unified) = match scope {
        Scope::App(app_id) => {
            let tables = query
                .names
                .map(|names| names.into_iter().collect::<Vec<_>>());
            (
                Interest::App(app_id.clone()),
                BTreeMap::from([(app_id, query.since)]),
                tables,
                false,
            )
        }
        Scope::Unified => {
            let apps = match &query.names {
                Some(apps) => apps.iter().cloned().collect(),
                None => context.store().user_apps(&user).await?,
            };
            let cursors = apps.into_iter().map(|a| (a, query.since)).collect();
            (Interest::Apps(query.names), cursors, None, true)
        }
    };
    let registration = context
        .hub()
        .register(&user, interest, Kind::Stream, device.clone())
        .map_err(|_| Refusal::TooManyStreams)?;

    let (sender, receiver) = mpsc::channel::<Bytes>(8);
    let tasks = context.tasks().clone();
    let stream = Stream {
        context,
        user,
        device,
        tables,
        unified,
        start: query.since,
        cursors,
        sender,
        expires,
    };
    tasks.spawn(stream.run(registration));

    let mut response = Response::new(EventStream(receiver));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

struct Stream {
    context: Arc<dyn Context>,
    user: String,
    device: Option<String>,
    tables: Option<Vec<String>>,
    unified: bool,
    /// Where an app the stream learns about later starts.
    start: Micros,
    /// Per app: everything up to here has been delivered.
    cursors: BTreeMap<String, Micros>,
    sender: mpsc::Sender<Bytes>,
    /// The token's expiry plus the leeway: the stream ends then.
    expires: tokio::time::Instant,
}

/// Why a stream ended.
enum End {
    ClientGone,
    Stalled,
    TokenExpired,
    Store(StoreError),
}

impl Stream {
    async fn run(mut self, registration: Registration) {
        let shutdown = self.context.shutdown().clone();
        let all: Vec<String> = self.cursors.keys().cloned().collect();
        let mut result = self.deliver(&all).await;
        let mut heartbeat = tokio::time::interval(self.context.config().sse_heartbeat);
        heartbeat.tick().await;
        while result.is_ok() {
            result = tokio::select! {
                hints = registration.subscriber.next_hints() => match hints {
                    Ok((hints, queued)) => {
                        let apps = self.apps_for(hints).await;
                        let delivered = self.deliver(&apps).await;
                        self.context.metrics().notify_delivery.observe(queued.elapsed().as_secs_f64());
                        delivered
                    }
                    Err(Evicted::SlowConsumer) => Err(End::Stalled),
                },
                _ = heartbeat.tick() => self.send(sse_event("heartbeat", None, "{}")).await,
                () = tokio::time::sleep_until(self.expires) => {
                    let why = json!({
                        "error": ErrorCode::TokenExpired.as_str(),
                        "message": "the token expired; reconnect with a fresh one and resume from your cursor",
                    });
                    self.send(sse_event("token-expired", None, &why.to_string())).await.and(Err(End::TokenExpired))
                },
                () = self.sender.closed() => Err(End::ClientGone),
                () = shutdown.cancelled() => break,
            };
        }
        match result {
            Err(End::Stalled) => self.context.hub().count_slow_consumer(),
            Err(End::Store(e)) => {
                // The client reconnects with Last-Event-ID (or its cursors) and resumes.
                log::warn(
                    "closing a stream after a database error",
                    &[("error", e.to_string().into())],
                );
            }
            _ => {}
        }
    }

    async fn apps_for(&mut self, hints: Vec<Hint>) -> Vec<String> {
        let mut apps = BTreeSet::new();
        for hint in hints {
            match hint {
                Hint::Changed { app, .. } => {
                    apps.insert(app);
                }
                Hint::Resync => {
                    if self.unified {
                        for app in self
                            .context
                            .store()
                            .user_apps(&self.user)
                            .await
                            .unwrap_or_default()
                        {
                            apps.insert(app);
                        }
                    }
                    apps.extend(self.cursors.keys().cloned());
                }
            }
        }
        for app in &apps {
            // An app this stream had not seen before starts at the stream's own starting point.
            self.cursors.entry(app.clone()).or_insert(self.start);
        }
        apps.into_iter().collect()
    }

    /// Delivers everything new in `apps`, page by page.
    async fn deliver(&mut self, apps: &[String]) -> Result<(), End> {
        let limit = self.context.config().pull_page_size;
        for app_id in apps {
            loop {
                let since = self.cursors[app_id];
                let page = self
                    .context
                    .store()
                    .app_changes(
                        &self.user,
                        app_id,
                        self.tables.as_deref(),
                        self.device.as_deref(),
                        since,
                        limit,
                    )
                    .await
                    .map_err(End::Store)?;
                let synced_until = page.synced_until;
                self.context.metrics().changes_pulled.fetch_add(
                    page.server_changes.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let groups = group_by_table(page.server_changes);
                let count = groups.len();
                for (index, (table, changes)) in groups.into_iter().enumerate() {
                    let mut data = json!({
                        "table": table, "changes": changes, "syncedUntil": time::format_cursor(page.synced_until), "hasMore": page.has_more,
                    });
                    let id = if self.unified {
                        data["appId"] = json!(app_id);
                        // Only once the page's last event is out has this app reached `synced_until`.
                        let reached = if index + 1 == count {
                            synced_until
                        } else {
                            since
                        };
                        Some(format_cursor(self.resume_point(app_id, reached)))
                    } else {
                        None
                    };
                    self.send(sse_event("changes", id.as_deref(), &data.to_string()))
                        .await?;
                }
                self.cursors.insert(app_id.clone(), synced_until.max(since));
                if !page.has_more {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The cursor up to which every app of this stream has been delivered, with `app` at `reached`.
    fn resume_point(&self, app: &str, reached: Micros) -> Micros {
        self.cursors
            .iter()
            .map(|(a, c)| if a == app { reached } else { *c })
            .min()
            .unwrap_or(reached)
    }

    async fn send(&self, event: String) -> Result<(), End> {
        match tokio::time::timeout(
            self.context.config().write_timeout,
            self.sender.send(Bytes::from(event)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => Err(End::Stalled),
        }
    }
}

/// Splits a page into per-table groups, keeping the order within each table.
fn group_by_table(changes: Vec<WireChange>) -> Vec<(String, Vec<WireChange>)> {
    let mut groups: Vec<(String, Vec<WireChange>)> = Vec::new();
    for change in changes {
        match groups.iter_mut().find(|(table, _)| *table == change.table) {
            Some((_, group)) => group.push(change),
            None => groups.push((change.table.clone(), vec![change])),
        }
    }
    groups
}

/// A stream's response body, fed by a channel: each message is one chunk on the wire.
pub(crate) struct EventStream(mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
