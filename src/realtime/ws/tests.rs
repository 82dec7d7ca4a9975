//! Sessions over `tokio::io::duplex` with paused time: the deadlines are checked in test time, not in seconds
//! of sleep. Nothing here reaches the database (a socket that does not authenticate never does).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::Role;
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::WebSocketStream;
use tokio::io::DuplexStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::serve_socket;
use crate::auth::{devkeys, AuthConfig, Authenticator};
use crate::clock::unix_now;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::realtime::{Context, Hub, Interest};
use crate::store::Store;

/// The parts of the state a session reads before it authenticates.
struct Fake {
    config: Config,
    auth: Authenticator,
    hub: Arc<Hub>,
    metrics: Metrics,
    shutdown: CancellationToken,
    unauthenticated: Arc<Semaphore>,
    tasks: tokio_util::task::TaskTracker,
}

impl Context for Fake {
    fn config(&self) -> &Config {
        &self.config
    }
    fn store(&self) -> &Store {
        unreachable!("a session that never authenticates does not read the store")
    }
    fn auth(&self) -> &Authenticator {
        &self.auth
    }
    fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn instance_id(&self) -> &str {
        "test"
    }
    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
    fn unauthenticated_sockets(&self) -> &Arc<Semaphore> {
        &self.unauthenticated
    }
    fn tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.tasks
    }
}

/// A session with `config` on its own task; the client's end of its socket, and the shutdown switch.
async fn start(config: Config) -> (WebSocketStream<DuplexStream>, CancellationToken) {
    start_with(config, Authenticator::new(AuthConfig::default())).await
}

async fn start_with(
    config: Config,
    auth: Authenticator,
) -> (WebSocketStream<DuplexStream>, CancellationToken) {
    start_session(config, auth, CancellationToken::new()).await
}

async fn start_with_shutdown(
    config: Config,
    shutdown: CancellationToken,
) -> (WebSocketStream<DuplexStream>, CancellationToken) {
    start_session(config, Authenticator::new(AuthConfig::default()), shutdown).await
}

async fn start_session(
    config: Config,
    auth: Authenticator,
    shutdown: CancellationToken,
) -> (WebSocketStream<DuplexStream>, CancellationToken) {
    let context = Arc::new(Fake {
        config,
        auth,
        hub: Arc::new(Hub::new(64, 10)),
        metrics: Metrics::default(),
        shutdown: shutdown.clone(),
        unauthenticated: Arc::new(Semaphore::new(1)),
        tasks: tokio_util::task::TaskTracker::new(),
    });
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let socket = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        serve_socket(context, socket, Interest::Apps(None), None).await
    });
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (client, shutdown)
}

/// The next frame the client reads: an error message's text, or a Close frame's code and reason.
async fn next(client: &mut WebSocketStream<DuplexStream>) -> Message {
    client
        .next()
        .await
        .expect("a frame")
        .expect("a readable frame")
}

fn assert_closed(message: Message, code: CloseCode, reason: &str) {
    match message {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, code);
            assert_eq!(frame.reason.as_str(), reason);
        }
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_auth_deadline_is_ten_seconds() {
    let started = Instant::now();
    let (mut client, _shutdown) = start(Config::defaults()).await;
    let early = tokio::time::timeout(Duration::from_millis(9_999), client.next()).await;
    assert!(early.is_err(), "still open just before 10 s");
    let error = next(&mut client).await;
    assert!(
        error.to_text().unwrap().contains("authentication timeout"),
        "{error:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_closed(
        next(&mut client).await,
        CloseCode::Policy,
        "authentication timeout",
    );
}

#[tokio::test(start_paused = true)]
async fn shutting_down_closes_an_unauthenticated_socket_with_going_away() {
    let (mut client, shutdown) = start(Config::defaults()).await;
    // Open for a while (paused time: no real wait) before the shutdown.
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    assert_closed(
        next(&mut client).await,
        CloseCode::Away,
        "server shutting down",
    );
}

/// A socket whose session starts after shutdown began (upgraded just before) closes at once too: it does
/// not wait for a change it missed.
#[tokio::test(start_paused = true)]
async fn a_socket_upgraded_as_shutdown_begins_closes_with_going_away() {
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let started = Instant::now();
    let (mut client, _) = start_with_shutdown(Config::defaults(), shutdown).await;
    assert_closed(
        next(&mut client).await,
        CloseCode::Away,
        "server shutting down",
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not at the auth deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn a_binary_frame_before_auth_closes_with_unsupported_data() {
    let (mut client, _shutdown) = start(Config::defaults()).await;
    client.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let error = next(&mut client).await;
    assert!(error.to_text().unwrap().contains("binary"), "{error:?}");
    assert_closed(
        next(&mut client).await,
        CloseCode::Unsupported,
        "binary frames are not supported",
    );
}

/// A key pair in a directory of its own, an `Authenticator` that trusts it, and a token for `user` that
/// expires after `ttl` (of the wall clock, which paused time does not stop).
async fn keys_and_token(name: &str, user: &str, ttl: Duration) -> (Authenticator, String) {
    let dir = std::env::temp_dir().join(format!("mana-sync-ws-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (key_path, jwks_path) = devkeys::write_dev_keys(&dir).unwrap();
    let (kid, key) = devkeys::load_signing_key(&key_path).unwrap();
    let auth = Authenticator::new(AuthConfig {
        jwks_file: Some(jwks_path),
        ..AuthConfig::default()
    });
    auth.refresh().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let token = devkeys::mint_token(&kid, &key, user, ttl, None, Some("mana"), unix_now());
    (auth, token)
}

/// Starts a session and authenticates it with `token`; `auth-ok` has been read. Also answers the shutdown
/// switch.
async fn authenticated(
    config: Config,
    auth: Authenticator,
    token: &str,
) -> (WebSocketStream<DuplexStream>, CancellationToken) {
    let (mut client, shutdown) = start_with(config, auth).await;
    let auth_message = serde_json::json!({"type": "auth", "token": token}).to_string();
    client.send(Message::text(auth_message)).await.unwrap();
    let reply = next(&mut client).await;
    assert!(reply.to_text().unwrap().contains("auth-ok"), "{reply:?}");
    (client, shutdown)
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_the_socket_with_4001_after_the_leeway() {
    let mut config = Config::defaults();
    config.ws_token_leeway = Duration::from_secs(5);
    let (auth, token) = keys_and_token("expiry", "expiring-user", Duration::from_secs(60)).await;
    let started = Instant::now();
    let (mut client, _shutdown) = authenticated(config, auth, &token).await;
    let early = tokio::time::timeout(Duration::from_secs(63), client.next()).await;
    assert!(early.is_err(), "still open before expiry plus leeway");
    assert_closed(
        next(&mut client).await,
        CloseCode::Library(super::CLOSE_TOKEN_EXPIRED),
        "token expired",
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(64) && elapsed <= Duration::from_secs(65),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_flood_beyond_the_burst_closes_the_socket() {
    let mut config = Config::defaults();
    config.ws_messages_per_second = 10;
    let (auth, token) = keys_and_token("flood", "flooding-user", Duration::from_secs(600)).await;
    let (mut client, _shutdown) = authenticated(config, auth, &token).await;
    // A burst of twice the rate is allowed; the next message in the same instant is not.
    for _ in 0..21 {
        let ping = serde_json::json!({"type": "ping"}).to_string();
        client.send(Message::text(ping)).await.unwrap();
    }
    for _ in 0..20 {
        let pong = next(&mut client).await;
        assert!(pong.to_text().unwrap().contains("pong"), "{pong:?}");
    }
    let error = next(&mut client).await;
    assert!(
        error.to_text().unwrap().contains("too many messages"),
        "{error:?}"
    );
    assert_closed(
        next(&mut client).await,
        CloseCode::Policy,
        "rate limit exceeded",
    );
}
