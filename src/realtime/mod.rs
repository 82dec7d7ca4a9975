//! Real time: telling connected devices that something changed.
//!
//! `hub` (connections by user, bounded queues of hints), `notify` (hints between instances through
//! PostgreSQL `LISTEN`/`NOTIFY`), `ws` (WebSocket sessions) and `sse` (Server-Sent Events streams).
//!
//! This layer sits below `http`: it never builds an HTTP error itself. What it refuses is a `Refusal`, which
//! `http::error` maps to a status code, and its bodies are its own (`sse::EventStream`), boxed by `http`.
//! It reaches the server's shared state only through `Context`, which the state implements.

pub(crate) mod hub;
pub(crate) mod notify;
pub(crate) mod sse;
pub(crate) mod ws;

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::ProtocolError;
use crate::store::{Store, StoreError};

pub use hub::MAX_HINT_TABLES;
pub(crate) use hub::{Hub, Interest, Kind};
pub(crate) use notify::listener;
pub use notify::LISTENER_NAME;

/// What sockets, streams and the listener need of the server's shared state.
pub(crate) trait Context: Send + Sync + 'static {
    fn config(&self) -> &Config;
    fn store(&self) -> &Store;
    fn auth(&self) -> &Authenticator;
    fn hub(&self) -> &Arc<Hub>;
    fn metrics(&self) -> &Metrics;
    /// Tells this instance's own cross-instance hints apart from other instances'.
    fn instance_id(&self) -> &str;
    /// Cancelled when the server starts shutting down.
    fn shutdown(&self) -> &CancellationToken;
    /// Where sockets and streams are spawned, so that shutdown waits for them.
    fn tasks(&self) -> &tokio_util::task::TaskTracker;
    /// WebSockets that have not authenticated yet (`WS_MAX_UNAUTHENTICATED`).
    fn unauthenticated_sockets(&self) -> &Arc<Semaphore>;
}

/// Why a socket or stream was not opened; `http::error` gives each its status code.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// A plain request to a WebSocket endpoint.
    UpgradeRequired,
    /// The WebSocket handshake was malformed.
    InvalidUpgrade(String),
    /// Too many sockets are waiting to authenticate.
    TooManyUnauthenticatedSockets,
    /// The user has as many sockets and streams as allowed.
    TooManyStreams,
    /// `Last-Event-ID` is not text.
    InvalidLastEventId,
    /// The stream's query string.
    Protocol(ProtocolError),
    /// Listing the user's apps failed.
    Store(StoreError),
}

impl From<ProtocolError> for Refusal {
    fn from(e: ProtocolError) -> Refusal {
        Refusal::Protocol(e)
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        Refusal::Store(e)
    }
}

/// An accepted connection's place under `MAX_CONNECTIONS`, put in every request's extensions by the server.
/// An upgraded WebSocket takes it over and holds it until it ends; what the place consists of is the
/// server's business.
#[derive(Clone)]
pub(crate) struct ConnectionSlot(Arc<Mutex<Option<Box<dyn Send + Sync>>>>);

/// A slot taken over by an upgraded connection: released when dropped.
pub(crate) struct HeldSlot(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl ConnectionSlot {
    pub(crate) fn new(place: impl Send + Sync + 'static) -> ConnectionSlot {
        ConnectionSlot(Arc::new(Mutex::new(Some(Box::new(place)))))
    }

    /// Takes the slot over (once; later calls get an empty one).
    pub(crate) fn take(&self) -> HeldSlot {
        HeldSlot(self.0.lock().take())
    }
}
