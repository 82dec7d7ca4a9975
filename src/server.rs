//! The accept loop: connection cap, per-connection HTTP/1.1 service, graceful shutdown.
//!
//! Modelled on mini-redis: a semaphore permit is taken before `accept` and moved into the connection's
//! task, so at most `max_connections` are served at once and the excess waits in the kernel's backlog;
//! accept errors (e.g. out of file descriptors) back off instead of spinning. `serve` takes the shutdown
//! signal as a future, so tests can run a server on port 0 and stop it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

use parking_lot::Mutex;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::app::{App, ConnectionGuard};
use crate::log;

/// A connection's place under `MAX_CONNECTIONS` and in the open-connection count, shared by its
/// requests; whoever takes it (an upgraded WebSocket) keeps it until it ends.
#[derive(Clone)]
pub struct ConnectionSlot(Arc<parking_lot::Mutex<Option<(OwnedSemaphorePermit, ConnectionGuard)>>>);

/// A slot taken over by an upgraded connection.
pub struct HeldSlot(#[allow(dead_code)] Option<(OwnedSemaphorePermit, ConnectionGuard)>);

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, guard: ConnectionGuard) -> ConnectionSlot {
        ConnectionSlot(Arc::new(parking_lot::Mutex::new(Some((permit, guard)))))
    }

    /// Takes the slot over (once; later calls get an empty one).
    pub fn take(&self) -> HeldSlot {
        HeldSlot(self.0.lock().take())
    }
}

/// Serves until `shutdown` resolves, then stops accepting and drains in-flight requests for at most the
/// configured shutdown timeout.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(app.config.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);

    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    log::warn("accept failed; backing off", &[("error", e.to_string().into())]);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The connection's slot (and its count in /health) is handed to a WebSocket on upgrade: an
        // upgraded socket keeps counting against MAX_CONNECTIONS until it ends.
        let slot = ConnectionSlot::new(permit, app.connection_opened());
        let activity = Arc::new(Activity::default());
        let service = {
            let app = app.clone();
            let activity = activity.clone();
            let slot = slot.clone();
            service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let activity = activity.clone();
                request.extensions_mut().insert(slot.clone());
                async move {
                    activity.begin();
                    let response = crate::http::handle(app, request).await;
                    activity.end();
                    response
                }
            })
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut drain = app.shutdown.subscribe();
        let idle_timeout = app.config.idle_timeout;
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = drain.changed() => {
                    // Finish the request in flight, then close instead of keeping the connection alive.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = activity.idle_for(idle_timeout) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                log::debug(
                    "connection ended with an error",
                    &[
                        ("peer", peer.to_string().into()),
                        ("error", e.to_string().into()),
                    ],
                );
            }
            drop(slot);
        });
    }

    drop(listener);
    log::info(
        "shutting down: draining connections",
        &[("open", app.open_connections().into())],
    );
    // Connections, upgraded sockets and streams watch this to begin their own graceful close.
    app.shutdown.send_replace(true);
    let deadline = tokio::time::Instant::now() + app.config.shutdown_timeout;
    while (app.open_connections() > 0 || app.hub.counts(None).0 > 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match app.open_connections() {
        0 => log::info("all connections drained", &[]),
        open => log::warn(
            "shutdown timeout reached with connections still open",
            &[("open", open.into())],
        ),
    }
    app.store.close();
}

/// What a connection is doing, for closing idle keep-alive connections.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last_change: Mutex<Option<Instant>>,
}

impl Activity {
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        *self.last_change.lock() = Some(Instant::now());
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        *self.last_change.lock() = Some(Instant::now());
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let opened = Instant::now();
        loop {
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let deadline = self.last_change.lock().unwrap_or(opened) + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A server running on a background task, for tests and embedding.
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// Binds `addr` (port 0 for any) and serves `app` until `stop` is called or the handle is dropped.
    pub async fn start(app: Arc<App>, addr: SocketAddr) -> std::io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, async move {
            let _ = stopped.await;
        }));
        Ok(ServerHandle {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => log::info("SIGTERM received", &[]),
        _ = interrupt.recv() => log::info("SIGINT received", &[]),
    }
}
