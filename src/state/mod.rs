//! The shared state of one server (`Shared`): what every connection, request handler, socket and stream
//! reaches through one `Arc`. Built by `startup`. Besides the handles of the layers below it holds the
//! server's own limits on requests in flight: `per_user` (request slots per user) and `body_budget`
//! (large bodies in flight, per user and in all).

pub(crate) mod body_budget;
pub(crate) mod per_user;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::billing::Billing;
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::realtime::{self, Hub, Kind};
use crate::server_tls::ServerTls;
use crate::store::Store;
use body_budget::BodyBudget;
use per_user::InFlight;

/// Shared state of one server: cheap to reach from every connection through an `Arc`.
pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    /// Cancelled when the server starts shutting down; connections, upgraded sockets, streams and background
    /// tasks end on it (a token, unlike a watched flag, also tells one that looks after the fact).
    pub shutdown: CancellationToken,
    /// Every connection, upgraded socket, stream and background task, so that shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Tells this instance's own cross-instance hints apart from other instances'.
    pub instance_id: String,
    /// Log rows removed by compaction since start.
    pub rows_pruned: AtomicU64,
    /// The billing gate; `None` when MANA_CREDITS_URL is unset.
    pub billing: Option<Billing>,
    pub metrics: Metrics,
    /// Permits for requests in flight (SPEC §11: saturation answers 503, it does not queue).
    pub request_permits: Arc<Semaphore>,
    /// WebSockets that have not authenticated yet (at most `WS_MAX_UNAUTHENTICATED`; more get 503).
    pub unauthenticated_sockets: Arc<Semaphore>,
    /// Requests in flight per user (at most `MAX_REQUESTS_PER_USER`; more get 429).
    pub requests_per_user: Arc<InFlight>,
    pub body_budget: Arc<BodyBudget>,
    /// The certificate clients are served with; `None`: plain HTTP.
    pub tls: Option<Arc<ServerTls>>,
    pub(crate) open_connections: AtomicUsize,
}

impl Shared {
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Counts an accepted connection until the returned guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }
}

pub struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// What `/metrics` shows of the rest of the server, read now.
    pub fn metrics_snapshot(&self) -> metrics::Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counts = |kind| {
            let (connections, users) = self.hub.counts(kind);
            (connections as u64, users as u64)
        };
        let hub = &self.hub.stats;
        let pool = self.store.pool_status();
        let groups = self.store.push_groups();
        metrics::Snapshot {
            inflight_body_bytes: self.body_budget.used() as u64,
            body_budget_refusals: self.body_budget.refusals(),
            http_connections: self.open_connections() as u64,
            sockets: counts(Some(Kind::Socket)),
            streams: counts(Some(Kind::Stream)),
            realtime_users: counts(None).1,
            notifications_queued: load(&hub.notifications_queued),
            notifications_coalesced: load(&hub.notifications_coalesced),
            notifications_dropped: load(&hub.notifications_dropped),
            slow_consumers_closed: load(&hub.slow_consumers_closed),
            billing_checks: self.billing.as_ref().map(|billing| {
                let stats = &billing.stats;
                [
                    load(&stats.active),
                    load(&stats.inactive),
                    load(&stats.failed_open),
                    load(&stats.cache_hits),
                ]
            }),
            jwks_refreshes: self.auth.refresh_stats(),
            jwks_keys: self.auth.key_count() as u64,
            pool_in_use: pool.in_use as u64,
            pool_idle: pool.idle as u64,
            pool_max: pool.max_size as u64,
            pool_waiting: pool.waiting as u64,
            rows_pruned: load(&self.rows_pruned),
            log_reads: self.store.known().stats(),
            token_checks: self.auth.verified_cache_stats(),
            times_beyond_skew: self.store.times_beyond_skew(),
            push_groups: (load(&groups.committed), load(&groups.failed)),
            grouped_pushes: (load(&groups.written), load(&groups.bounced)),
            known_stamps_users: self.store.known().len() as u64,
        }
    }
}

/// Sockets, streams and the listener reach the state through this.
impl realtime::Context for Shared {
    fn config(&self) -> &Config {
        &self.config
    }

    fn store(&self) -> &Store {
        &self.store
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
        &self.instance_id
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    fn unauthenticated_sockets(&self) -> &Arc<Semaphore> {
        &self.unauthenticated_sockets
    }
}
