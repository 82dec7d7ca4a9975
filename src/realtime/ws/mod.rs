//! WebSocket sessions (`/ws` unified, `/ws/{appId}` legacy).
//!
//! A session authenticates in-band within a deadline enforced by a real timer, registers with the hub,
//! then forwards the hub's hints as `sync-available` messages until the socket closes, the token expires
//! (close 4001 unless the client re-authenticated), the hub evicts it as a slow consumer (1013), or the
//! server shuts down (1001). Bad or missing auth closes with 1008.

use std::collections::BTreeSet;
use std::convert::Infallible;
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
use hyper_tungstenite::tungstenite::{Error as ReadError, Message, Utf8Bytes};
use hyper_tungstenite::{HyperWebsocket, WebSocketStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hub::{Evicted, Hint, Interest, Kind, RegisterError, Registration};
use super::{ConnectionSlot, Context, Refusal};
use crate::auth::Claims;
use crate::clock::unix_now;
use crate::log;
use crate::protocol::realtime::{
    parse_client_message, ClientMessage, ServerMessage, MAX_CLIENT_MESSAGE_BYTES,
};

/// A frame as the stream yields it (`None`: the stream ended).
type Frame = Option<Result<Message, ReadError>>;
/// A token's claims and the client id the `auth` message named.
type Authenticated = (Claims, Option<String>);
/// Hints as the hub hands them over, with when the oldest was queued.
type Hints = (Vec<Hint>, std::time::Instant);

/// Close code for a token that expired without being refreshed.
pub(crate) const CLOSE_TOKEN_EXPIRED: u16 = 4001;

const TOKEN_EXPIRED: Close = Close::With(CloseCode::Library(CLOSE_TOKEN_EXPIRED), "token expired");

/// Answers the upgrade and starts the session on its own task.
pub(crate) fn upgrade(
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
    context.tasks().clone().spawn(async move {
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
    serve_socket(context, socket, interest, Some(unauthenticated)).await;
}

/// Serves one upgraded socket until the session ends, then closes it. Generic over the byte stream, so that
/// tests can run a session over `tokio::io::duplex` with paused time.
async fn serve_socket<S: AsyncRead + AsyncWrite + Unpin>(
    context: Arc<dyn Context>,
    socket: WebSocketStream<S>,
    interest: Interest,
    unauthenticated: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let (sink, stream) = socket.split();
    let mut session = Session {
        context,
        sink,
        stream,
        interest,
        unauthenticated,
    };
    let Err(close) = session.serve().await;
    if let Close::With(code, reason) = close {
        session.close(code, reason).await;
    }
}

struct Session<S> {
    context: Arc<dyn Context>,
    sink: SplitSink<WebSocketStream<S>, Message>,
    stream: SplitStream<WebSocketStream<S>>,
    interest: Interest,
    /// Held until the socket authenticated (`WS_MAX_UNAUTHENTICATED`).
    unauthenticated: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// How a session ends from our side.
enum Close {
    /// The client left, the socket failed or a write stalled: the socket is dropped without a Close frame.
    Drop,
    /// A Close frame with this code and reason, then the closing handshake.
    With(CloseCode, &'static str),
}

const GOING_AWAY: Close = Close::With(CloseCode::Away, "server shutting down");

/// What an authenticated, registered session keeps while it forwards hints.
struct Live {
    user: String,
    /// Deregisters the socket from the hub when dropped.
    registration: Registration,
    /// When the socket closes with 4001 unless the client re-authenticates first.
    expires: Instant,
    limiter: RateLimiter,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The three phases: authentication within the deadline, registration, forwarding. Ends only with the
    /// way the session closes.
    async fn serve(&mut self) -> Result<Infallible, Close> {
        let shutdown = self.context.shutdown().clone();
        let (claims, device) = self.auth(&shutdown).await?;
        let mut live = self.register(&claims, device).await?;
        loop {
            tokio::select! {
                hints = live.registration.subscriber.next_hints() => self.on_hints(&live, hints).await?,
                incoming = self.stream.next() => self.on_incoming(&mut live, incoming).await?,
                () = tokio::time::sleep_until(live.expires) => return Err(TOKEN_EXPIRED),
                () = shutdown.cancelled() => return Err(GOING_AWAY),
            }
        }
    }

    /// Phase 1: waits for the `auth` message until the deadline; anything else first closes the socket.
    async fn auth(&mut self, shutdown: &CancellationToken) -> Result<Authenticated, Close> {
        let deadline = Instant::now() + self.context.config().ws_auth_timeout;
        loop {
            let incoming = tokio::select! {
                incoming = tokio::time::timeout_at(deadline, self.stream.next()) => incoming,
                () = shutdown.cancelled() => return Err(GOING_AWAY),
            };
            let Ok(incoming) = incoming else {
                let message = "authentication timeout: send {\"type\":\"auth\",\"token\":…} first";
                return Err(self
                    .refuse(message, CloseCode::Policy, "authentication timeout")
                    .await);
            };
            if let Some(text) = self.text_of(incoming).await? {
                return self.authenticate(&text).await;
            }
        }
    }

    /// The first text message: it must be a valid `auth`.
    async fn authenticate(&mut self, text: &str) -> Result<Authenticated, Close> {
        const REQUIRED: &str = "authentication required";
        match parse_client_message(text) {
            Ok(ClientMessage::Auth {
                token,
                client_id: device,
            }) => match self.context.auth().verify(&token).await {
                Ok(claims) => Ok((claims, device)),
                Err(e) => Err(self.auth_failed(e).await),
            },
            Ok(ClientMessage::Ping) => Err(self
                .refuse("authenticate first", CloseCode::Policy, REQUIRED)
                .await),
            Err(e) => {
                let message = format!("authenticate first: {e}");
                Err(self.refuse(&message, CloseCode::Policy, REQUIRED).await)
            }
        }
    }

    /// Phase 2: takes the user's place in the hub, answers `auth-ok` and nudges a legacy client once.
    async fn register(&mut self, claims: &Claims, device: Option<String>) -> Result<Live, Close> {
        self.unauthenticated.take();
        let user = claims.sub.clone();
        let hub = self.context.hub();
        let registration = match hub.register(&user, self.interest.clone(), Kind::Socket, device) {
            Ok(registration) => registration,
            Err(RegisterError::TooManyConnections { limit }) => {
                let message = format!(
                    "too many real-time connections (WebSockets and streams) for this user (limit {limit})"
                );
                return Err(self
                    .refuse(&message, CloseCode::Policy, "too many connections")
                    .await);
            }
        };
        self.send_or_stall(&ServerMessage::AuthOk).await?;
        // The legacy client does not pull by itself after reconnecting: nudge it once.
        if let Interest::App(app_id) = &self.interest {
            let message = self.sync_available(&user, app_id, None).await;
            self.send_or_stall(&message).await?;
        }
        let config = self.context.config();
        Ok(Live {
            expires: token_deadline(claims, config.ws_token_leeway),
            limiter: RateLimiter::new(config.ws_messages_per_second),
            user,
            registration,
        })
    }

    /// Phase 3, the hub's side: hints become `sync-available` messages.
    async fn on_hints(&mut self, live: &Live, hints: Result<Hints, Evicted>) -> Result<(), Close> {
        let (hints, queued) = hints.map_err(|Evicted::SlowConsumer| {
            Close::With(CloseCode::Again, "slow consumer: notification queue full")
        })?;
        for message in self.messages_for(&live.user, hints).await {
            self.send_or_stall(&message).await?;
        }
        let delivery = queued.elapsed().as_secs_f64();
        self.context.metrics().notify_delivery.observe(delivery);
        Ok(())
    }

    /// Phase 3, the client's side: a frame, rate limited once it is a text message.
    async fn on_incoming(&mut self, live: &mut Live, incoming: Frame) -> Result<(), Close> {
        let Some(text) = self.text_of(incoming).await? else {
            return Ok(());
        };
        if !live.limiter.allow() {
            let rate_limited = "rate limit exceeded";
            return Err(self
                .refuse("too many messages", CloseCode::Policy, rate_limited)
                .await);
        }
        match parse_client_message(&text) {
            Ok(ClientMessage::Ping) => self.send_or_stall(&ServerMessage::Pong).await,
            Ok(ClientMessage::Auth {
                token,
                client_id: device,
            }) => self.reauthenticate(live, &token, device).await,
            Err(e) => {
                self.send_error(&e).await;
                Ok(())
            }
        }
    }

    /// A fresh token for the same user moves the expiry (and may set the client id).
    async fn reauthenticate(
        &mut self,
        live: &mut Live,
        token: &str,
        device: Option<String>,
    ) -> Result<(), Close> {
        match self.context.auth().verify(token).await {
            Ok(fresh) if fresh.sub == live.user => {
                live.expires = token_deadline(&fresh, self.context.config().ws_token_leeway);
                if device.is_some() {
                    live.registration.subscriber.set_device(device);
                }
                self.send_or_stall(&ServerMessage::AuthOk).await
            }
            Ok(_) => {
                let message = "a socket cannot change its user";
                Err(self
                    .refuse(message, CloseCode::Policy, "user changed")
                    .await)
            }
            Err(e) => Err(self.auth_failed(e).await),
        }
    }

    /// A frame as read: `Some(text)` for a text message, `None` for a control frame (tungstenite answers
    /// pings itself); anything else ends the session.
    async fn text_of(&mut self, incoming: Frame) -> Result<Option<Utf8Bytes>, Close> {
        match incoming {
            None | Some(Ok(Message::Close(_))) => Err(Close::Drop),
            Some(Err(e)) => Err(self.read_failed(e).await),
            Some(Ok(Message::Text(text))) => Ok(Some(text)),
            Some(Ok(Message::Binary(_))) => {
                let binary = "binary frames are not supported";
                Err(self.refuse(binary, CloseCode::Unsupported, binary).await)
            }
            Some(Ok(_control)) => Ok(None),
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

    /// Sends `message`; a client that stopped reading ends the session.
    async fn send_or_stall(&mut self, message: &ServerMessage) -> Result<(), Close> {
        if self.send(message).await {
            return Ok(());
        }
        self.context.hub().count_slow_consumer();
        log::debug("closing a WebSocket that stopped reading", &[]);
        // Writing a close frame would block the same way; the socket is dropped instead.
        Err(Close::Drop)
    }

    /// Sends the error `message`, then closes with `code` and `reason`.
    async fn refuse(&mut self, message: &str, code: CloseCode, reason: &'static str) -> Close {
        self.send_error(message).await;
        Close::With(code, reason)
    }

    async fn auth_failed(&mut self, error: impl std::fmt::Display) -> Close {
        let message = format!("authentication failed: {error}");
        self.refuse(&message, CloseCode::Policy, "authentication failed")
            .await
    }

    async fn read_failed(&mut self, error: ReadError) -> Close {
        match error {
            ReadError::Capacity(_) => {
                let too_large = "message too large";
                self.refuse(too_large, CloseCode::Size, too_large).await
            }
            ReadError::Protocol(_) | ReadError::Utf8(_) => {
                Close::With(CloseCode::Protocol, "protocol error")
            }
            _ => Close::Drop,
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

#[cfg(test)]
mod tests;
