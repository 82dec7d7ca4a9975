//! Sessions over `tokio::io::duplex` with paused time: the deadlines are checked in test time, not in seconds
//! of sleep. Nothing here reaches the database (a socket that does not authenticate never does).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::Role;
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::WebSocketStream;
use tokio::io::DuplexStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::serve_socket;
use crate::auth::{AuthConfig, Authenticator};
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
    shutdown: watch::Receiver<bool>,
    unauthenticated: Arc<Semaphore>,
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
    fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
    fn unauthenticated_sockets(&self) -> &Arc<Semaphore> {
        &self.unauthenticated
    }
}

/// A session with `config` on its own task; the client's end of its socket, and the shutdown switch.
async fn start(config: Config) -> (WebSocketStream<DuplexStream>, watch::Sender<bool>) {
    let (shutdown_tx, shutdown) = watch::channel(false);
    let context = Arc::new(Fake {
        config,
        auth: Authenticator::new(AuthConfig::default()),
        hub: Arc::new(Hub::new(64, 10)),
        metrics: Metrics::default(),
        shutdown,
        unauthenticated: Arc::new(Semaphore::new(1)),
    });
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let socket = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        serve_socket(context, socket, Interest::Apps(None), None).await
    });
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (client, shutdown_tx)
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
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.send(true).unwrap();
    assert_closed(
        next(&mut client).await,
        CloseCode::Away,
        "server shutting down",
    );
}

#[tokio::test(start_paused = true)]
async fn a_binary_frame_before_auth_closes_with_unsupported_data() {
    let (mut client, _shutdown) = start(Config::defaults()).await;
    futures_util::SinkExt::send(&mut client, Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    let error = next(&mut client).await;
    assert!(error.to_text().unwrap().contains("binary"), "{error:?}");
    assert_closed(
        next(&mut client).await,
        CloseCode::Unsupported,
        "binary frames are not supported",
    );
}
