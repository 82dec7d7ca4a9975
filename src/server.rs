//! The accept loop: connection cap, TLS handshake, per-connection HTTP/1.1 or HTTP/2 service, graceful
//! shutdown.
//!
//! Modelled on mini-redis: a semaphore permit is taken before `accept` and moved into the connection's
//! task, so at most `max_connections` are served at once and the excess waits in the kernel's backlog;
//! accept errors (e.g. out of file descriptors) back off instead of spinning. `serve` takes the shutdown
//! signal as a future, so tests can run a server on port 0 and stop it.
//!
//! A connection's path: accept (holding a permit) → TLS handshake when `TLS_CERT_FILE` is set, within the
//! header read timeout → hyper-util's auto builder, which serves HTTP/2 when the connection starts with
//! the HTTP/2 preface (ALPN `h2`, or cleartext h2c with prior knowledge) and HTTP/1.1 otherwise. Every
//! request — an HTTP/1.1 request or an HTTP/2 stream — goes through `http::handle`, so the request,
//! per-user and body limits apply per stream; HTTP/2 adds its own caps per connection (concurrent streams,
//! header list size) and keep-alive pings.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::Body;
use crate::log;
use crate::realtime::ConnectionSlot;
use crate::state::Shared;

/// HTTP/2 keep-alive: a PING after this long without frames from the client…
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// …which must be answered within this, or the connection is closed (a peer that vanished).
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The connection builder every connection is served with: HTTP/1.1 and HTTP/2, told apart by the preface.
fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_header_list_size(config.http2_max_header_list_bytes)
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    builder
}

/// The accept loop: serves until `shutdown` resolves, then stops accepting and drains (`drain`).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(shared.config.max_connections));
    let builder = Arc::new(connection_builder(&shared.config));
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
        // The connection's slot (and its count in /health) is held from accept, through the TLS handshake,
        // and handed to a WebSocket on upgrade: an upgraded socket keeps counting against MAX_CONNECTIONS
        // until it ends.
        let slot = ConnectionSlot::new((permit, shared.connection_opened()));
        shared.tasks.spawn(connection(
            shared.clone(),
            builder.clone(),
            stream,
            peer,
            slot,
        ));
    }

    drop(listener);
    drain(&shared).await;
}

/// Tells every connection, socket, stream and background task to end, waits for them up to the shutdown
/// timeout, then closes the pool.
async fn drain(shared: &Shared) {
    log::info(
        "shutting down: draining connections",
        &[("open", shared.open_connections().into())],
    );
    // Connections, upgraded sockets, streams and background tasks end on this (gracefully).
    shared.shutdown.cancel();
    // Every one of them runs in `shared.tasks`: wait for them all, up to the timeout.
    shared.tasks.close();
    let _ = tokio::time::timeout(shared.config.shutdown_timeout, shared.tasks.wait()).await;
    match shared.open_connections() {
        0 => log::info("all connections drained", &[]),
        open => log::warn(
            "shutdown timeout reached with connections still open",
            &[("open", open.into())],
        ),
    }
    shared.store.close();
}

/// One accepted connection, from the TLS handshake (if any) to its end. The slot is released when this
/// returns (unless a WebSocket took it over).
async fn connection(
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let drain = shared.shutdown.clone();
    let Some(tls) = shared.tls.clone() else {
        return serve_http(shared, &builder, stream, peer, slot, drain).await;
    };
    // A client that connects and says nothing (or shakes hands slowly) gets the header read timeout for
    // the whole handshake; until then it holds its slot like any other connection.
    let handshake = tokio::time::timeout(
        shared.config.header_read_timeout,
        tls.acceptor().accept(stream),
    );
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                log::debug(
                    "TLS handshake failed",
                    &[("peer", peer.to_string().into()), ("error", e.to_string().into())],
                );
                return;
            }
            Err(_) => {
                log::debug("TLS handshake timed out", &[("peer", peer.to_string().into())]);
                return;
            }
        },
        () = drain.cancelled() => return,
    };
    serve_http(shared, &builder, stream, peer, slot, drain).await
}

/// Serves HTTP/1.1 or HTTP/2 on `io` until the client leaves, the connection idles, or the server drains.
async fn serve_http<I>(
    shared: Arc<Shared>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    peer: SocketAddr,
    slot: ConnectionSlot,
    drain: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = {
        let shared = shared.clone();
        let activity = activity.clone();
        let slot = slot.clone();
        service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let busy = activity.begin();
            request.extensions_mut().insert(slot.clone());
            async move {
                let response = crate::http::handle(shared, request).await?;
                // Busy until the response body is finished: a stream (SSE) keeps its connection in use.
                Ok::<_, std::convert::Infallible>(response.map(|body| TrackedBody { body, busy }))
            }
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let (header_read_timeout, idle_timeout) = (
        shared.config.header_read_timeout,
        shared.config.idle_timeout,
    );
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = drain.cancelled() => {
            // Finish the requests in flight (HTTP/2: GOAWAY, then the open streams), then close instead
            // of keeping the connection alive. One that never began a request has nothing to finish.
            if !activity.ever_busy() {
                return;
            }
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = activity.idle_for(idle_timeout) => {
            if !activity.ever_busy() {
                return;
            }
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        // HTTP/1.1 arms its own header timer, but the HTTP/2 preface and a silent client are read before
        // hyper knows which protocol it serves: the first request must begin within the header timeout.
        () = activity.no_request_within(header_read_timeout) => {
            log::debug("no request within the header read timeout", &[("peer", peer.to_string().into())]);
            return;
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
}

/// A response body that keeps its connection counted as busy until it is finished or dropped.
struct TrackedBody {
    body: Body,
    #[allow(dead_code)]
    busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a connection is doing, for closing idle keep-alive connections. Atomics and a `parking_lot` mutex
/// (held for an assignment, never across an await): every request of the connection touches them.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    ever_busy: AtomicBool,
    last_change: Mutex<Option<Instant>>,
}

/// A request of the connection in flight (its handler or its response body); ends when dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        *self.0.last_change.lock() = Some(Instant::now());
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.ever_busy.store(true, Ordering::Relaxed);
        *self.last_change.lock() = Some(Instant::now());
        Busy(self.clone())
    }

    fn ever_busy(&self) -> bool {
        self.ever_busy.load(Ordering::Relaxed)
    }

    /// Resolves if no request has begun `timeout` after the call; otherwise never.
    async fn no_request_within(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
        if self.ever_busy() {
            std::future::pending::<()>().await;
        }
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
    /// Binds `addr` (port 0 for any) and serves `shared` until `stop` is called or the handle is dropped.
    pub async fn start(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, shared, async move {
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
