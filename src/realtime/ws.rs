//! WebSocket sessions (`/ws` unified, `/ws/{appId}` legacy).
//!
//! A session authenticates in-band within a deadline enforced by a real timer, registers with the hub,
//! then forwards the hub's hints as `sync-available` messages until the socket closes, the token expires
//! (close 4001 unless the client re-authenticated), the hub evicts it as a slow consumer (1013), or the
//! server shuts down (1001). Bad or missing auth closes with 1008.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::{HyperWebsocket, HyperWebsocketStream};
use tokio::time::Instant;

use super::hub::{Evicted, Hint, Interest, Kind, RegisterError};
use super::{ConnectionSlot, Context, Refusal};
use crate::auth::Claims;
use crate::clock::unix_now;
use crate::log;
use crate::protocol::realtime::{
    parse_client_message, ClientMessage, ServerMessage, MAX_CLIENT_MESSAGE_BYTES,
};

type Sink = SplitSink<HyperWebsocketStream, Message>;
type Stream = SplitStream<HyperWebsocketStream>;

/// Close code for a token that expired without being refreshed.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Answers the upgrade and starts the session on its own task.
pub fn upgrade(
    context: Arc<dyn Context>,
    mut request: Request<Incoming>,
    interest: Interest,
) -> Result<Response<Full<Bytes>>, Refusal> {
    if !hyper_tungstenite::is_upgrade_request(&request) {
        return Err(Refusal::UpgradeRequired);
    }
    // Idle sockets are the common case: small buffers (tungstenite's defaults are 128 KiB each, which made
    // an idle socket cost ~138 KiB in BENCHMARKS.md), messages written out at once.
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_CLIENT_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_CLIENT_MESSAGE_BYTES);
    config.read_buffer_size = 4 * 1024;
    config.write_buffer_size = 0;
    config.max_write_buffer_size = 256 * 1024;
    let (response, websocket) = hyper_tungstenite::upgrade(&mut request, Some(config))
        .map_err(|e| Refusal::InvalidUpgrade(e.to_string()))?;
    // Not yet authenticated sockets have a small global cap of their own (they cost a socket and a task for
    // up to WS_AUTH_TIMEOUT_MS before anyone knows whose they are).
    let unauthenticated = context
        .unauthenticated_sockets()
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::TooManyUnauthenticatedSockets)?;
    // The upgraded socket keeps its connection's place under MAX_CONNECTIONS until it ends.
    let slot = request
        .extensions()
        .get::<ConnectionSlot>()
        .map(ConnectionSlot::take);
    tokio::spawn(async move {
        let _slot = slot;
        run(context, websocket, interest, unauthenticated).await
    });
    Ok(response)
}

async fn run(
    context: Arc<dyn Context>,
    websocket: HyperWebsocket,
    interest: Interest,
    unauthenticated: tokio::sync::OwnedSemaphorePermit,
) {
    let socket = match websocket.await {
        Ok(socket) => socket,
        Err(e) => {
            log::debug(
                "WebSocket upgrade did not complete",
                &[("error", e.to_string().into())],
            );
            return;
        }
    };
    let (sink, stream) = socket.split();
    let mut session = Session {
        context,
        sink,
        stream,
        interest,
        unauthenticated: Some(unauthenticated),
    };
    let close = session.serve().await;
    if let Some((code, reason)) = close {
        session.close(code, reason).await;
    }
}

struct Session {
    context: Arc<dyn Context>,
    sink: Sink,
    stream: Stream,
    interest: Interest,
    /// Held until the socket authenticated (`WS_MAX_UNAUTHENTICATED`).
    unauthenticated: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What ends a session from our side: the close code and its reason. `None`: the client left.
type Ending = Option<(CloseCode, &'static str)>;

impl Session {
    async fn serve(&mut self) -> Ending {
        let mut shutdown = self.context.shutdown();
        if *shutdown.borrow() {
            return Some((CloseCode::Away, "server shutting down"));
        }

        // 1. Authentication, within the deadline.
        let deadline = Instant::now() + self.context.config().ws_auth_timeout;
        let (claims, client_id) = loop {
            let incoming = tokio::select! {
                incoming = tokio::time::timeout_at(deadline, self.stream.next()) => incoming,
                _ = shutdown.changed() => return Some((CloseCode::Away, "server shutting down")),
            };
            let text = match incoming {
                Err(_elapsed) => {
                    self.send_error(
                        "authentication timeout: send {\"type\":\"auth\",\"token\":…} first",
                    )
                    .await;
                    return Some((CloseCode::Policy, "authentication timeout"));
                }
                Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return None,
                Ok(Some(Err(e))) => return self.read_failed(e).await,
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Binary(_)))) => {
                    self.send_error("binary frames are not supported").await;
                    return Some((CloseCode::Unsupported, "binary frames are not supported"));
                }
                Ok(Some(Ok(_control))) => continue,
            };
            match parse_client_message(&text) {
                Ok(ClientMessage::Auth { token, client_id }) => {
                    match self.context.auth().verify(&token).await {
                        Ok(claims) => break (claims, client_id),
                        Err(e) => {
                            self.send_error(&format!("authentication failed: {e}"))
                                .await;
                            return Some((CloseCode::Policy, "authentication failed"));
                        }
                    }
                }
                Ok(ClientMessage::Ping) => {
                    self.send_error("authenticate first").await;
                    return Some((CloseCode::Policy, "authentication required"));
                }
                Err(e) => {
                    self.send_error(&format!("authenticate first: {e}")).await;
                    return Some((CloseCode::Policy, "authentication required"));
                }
            }
        };

        // 2. Registration.
        self.unauthenticated.take();
        let user = claims.sub.clone();
        let registration = match self.context.hub().register(
            &user,
            self.interest.clone(),
            Kind::Socket,
            client_id,
        ) {
            Ok(registration) => registration,
            Err(RegisterError::TooManyConnections { limit }) => {
                self.send_error(&format!(
                        "too many real-time connections (WebSockets and streams) for this user (limit {limit})"
                    ))
                    .await;
                return Some((CloseCode::Policy, "too many connections"));
            }
        };
        if !self.send(&ServerMessage::AuthOk).await {
            return self.write_stalled();
        }
        // The legacy client does not pull by itself after reconnecting: nudge it once.
        if let Interest::App(app_id) = &self.interest {
            let message = self.sync_available(&user, app_id, None).await;
            if !self.send(&message).await {
                return self.write_stalled();
            }
        }

        // 3. Forwarding until something ends the session.
        let mut expires = token_deadline(&claims, self.context.config().ws_token_leeway);
        let mut limiter = RateLimiter::new(self.context.config().ws_messages_per_second);
        loop {
            tokio::select! {
                hints = registration.subscriber.next_hints() => match hints {
                    Ok((hints, queued)) => {
                        for message in self.messages_for(&user, hints).await {
                            if !self.send(&message).await {
                                return self.write_stalled();
                            }
                        }
                        self.context.metrics().notify_delivery.observe(queued.elapsed().as_secs_f64());
                    }
                    Err(Evicted::SlowConsumer) => return Some((CloseCode::Again, "slow consumer: notification queue full")),
                },
                incoming = self.stream.next() => {
                    let text = match incoming {
                        None | Some(Ok(Message::Close(_))) => return None,
                        Some(Err(e)) => return self.read_failed(e).await,
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(_))) => {
                            self.send_error("binary frames are not supported").await;
                            return Some((CloseCode::Unsupported, "binary frames are not supported"));
                        }
                        Some(Ok(_control)) => continue,
                    };
                    if !limiter.allow() {
                        self.send_error("too many messages").await;
                        return Some((CloseCode::Policy, "rate limit exceeded"));
                    }
                    match parse_client_message(&text) {
                        Ok(ClientMessage::Ping) => {
                            if !self.send(&ServerMessage::Pong).await {
                                return self.write_stalled();
                            }
                        }
                        Ok(ClientMessage::Auth { token, client_id }) => match self.context.auth().verify(&token).await {
                            Ok(fresh) if fresh.sub == user => {
                                expires = token_deadline(&fresh, self.context.config().ws_token_leeway);
                                if client_id.is_some() {
                                    registration.subscriber.set_client_id(client_id);
                                }
                                if !self.send(&ServerMessage::AuthOk).await {
                                    return self.write_stalled();
                                }
                            }
                            Ok(_) => {
                                self.send_error("a socket cannot change its user").await;
                                return Some((CloseCode::Policy, "user changed"));
                            }
                            Err(e) => {
                                self.send_error(&format!("authentication failed: {e}")).await;
                                return Some((CloseCode::Policy, "authentication failed"));
                            }
                        },
                        Err(e) => self.send_error(&e).await,
                    }
                }
                () = tokio::time::sleep_until(expires) => {
                    return Some((CloseCode::Library(CLOSE_TOKEN_EXPIRED), "token expired"));
                }
                _ = shutdown.changed() => return Some((CloseCode::Away, "server shutting down")),
            }
        }
    }

    /// Turns hints into `sync-available` messages, one per app.
    async fn messages_for(&self, user: &str, hints: Vec<Hint>) -> Vec<ServerMessage> {
        let mut messages = Vec::new();
        for hint in hints {
            match hint {
                Hint::Changed { app, tables } => {
                    messages.push(self.sync_available(user, &app, tables).await)
                }
                Hint::Resync => {
                    let apps = match &self.interest {
                        Interest::App(app) => vec![app.clone()],
                        Interest::Apps(Some(apps)) => apps.iter().cloned().collect(),
                        Interest::Apps(None) => self
                            .context
                            .store()
                            .user_apps(user)
                            .await
                            .unwrap_or_default(),
                    };
                    for app in apps {
                        messages.push(self.sync_available(user, &app, None).await);
                    }
                }
            }
        }
        messages
    }

    /// `tables: None` (not known) is answered with every table the user has in that app.
    async fn sync_available(
        &self,
        user: &str,
        app: &str,
        tables: Option<BTreeSet<String>>,
    ) -> ServerMessage {
        let tables = match tables {
            Some(tables) => tables.into_iter().collect(),
            None => self
                .context
                .store()
                .app_tables(user, app)
                .await
                .unwrap_or_default(),
        };
        ServerMessage::SyncAvailable {
            app_id: app.to_owned(),
            tables,
        }
    }

    /// Sends one message, giving up after the write timeout (the client stopped reading). False: give up.
    async fn send(&mut self, message: &ServerMessage) -> bool {
        let frame = Message::text(message.to_json());
        matches!(
            tokio::time::timeout(self.context.config().write_timeout, self.sink.send(frame)).await,
            Ok(Ok(()))
        )
    }

    async fn send_error(&mut self, message: &str) {
        let _ = self
            .send(&ServerMessage::Error {
                message: message.to_owned(),
            })
            .await;
    }

    fn write_stalled(&self) -> Ending {
        self.context.hub().count_slow_consumer();
        log::debug("closing a WebSocket that stopped reading", &[]);
        // Writing a close frame would block the same way; the socket is dropped instead.
        None
    }

    async fn read_failed(&mut self, error: hyper_tungstenite::tungstenite::Error) -> Ending {
        use hyper_tungstenite::tungstenite::Error;
        match error {
            Error::Capacity(_) => {
                self.send_error("message too large").await;
                Some((CloseCode::Size, "message too large"))
            }
            Error::Protocol(_) | Error::Utf8(_) => Some((CloseCode::Protocol, "protocol error")),
            _ => None,
        }
    }

    async fn close(&mut self, code: CloseCode, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.send(frame)).await;
        // The closing handshake: read (and discard) until the client's Close, for at most a second. Closing
        // the TCP socket with unread data in it would make the kernel send a reset, and the client would
        // lose our Close frame and its reason.
        let drain = async {
            while let Some(Ok(message)) = self.stream.next().await {
                if message.is_close() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
    }
}

/// When a socket (or stream) authenticated with `claims` must close unless refreshed: at expiry plus the
/// leeway.
pub(crate) fn token_deadline(claims: &Claims, leeway: Duration) -> Instant {
    let remaining = claims.exp.saturating_sub(unix_now()).max(0) as u64;
    Instant::now() + Duration::from_secs(remaining) + leeway
}

/// A token bucket: `rate` messages per second on average, bursts of twice that.
struct RateLimiter {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(rate: u32) -> RateLimiter {
        let rate = f64::from(rate.max(1));
        RateLimiter {
            rate,
            capacity: rate * 2.0,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
