//! The pool of PostgreSQL connections: `deadpool-postgres`, with what the store adds around it.
//!
//! deadpool bounds the number of connections, makes a waiter give up after `acquire_timeout` (the HTTP layer
//! turns that into 503 + Retry-After instead of letting an unbounded queue build up), counts waiters in a
//! way a cancelled request cannot leak, drops a closed connection instead of handing it out again, and keeps
//! each connection's prepared statements. This module adds the one rule deadpool cannot know: a connection
//! given back while a transaction begun by hand may still be open is closed, not reused.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, PoolError, QueueMode, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::{Client, Statement};

use crate::client_tls::{PgTls, TlsRefused};

use super::{Cause, StoreError};

pub struct Pool {
    pool: deadpool_postgres::Pool,
    config: tokio_postgres::Config,
    /// TLS as `DATABASE_URL`'s `sslmode` asks, for every connection of the pool and the dedicated ones.
    tls: PgTls,
}

/// A connection on loan; it goes back to the pool when dropped, unless it broke or is inside a transaction.
pub struct PooledConnection {
    /// Present until drop.
    object: Option<Object>,
    /// Set while a transaction begun by hand (a pipelined `BEGIN`) may still be open. A connection given
    /// back in that state (its request was cancelled mid-way) is closed instead of reused, which makes
    /// PostgreSQL roll the transaction back and release its locks.
    pub(super) in_transaction: bool,
}

impl PooledConnection {
    fn object(&self) -> &Object {
        self.object.as_ref().expect("connection present until drop")
    }

    pub fn client(&self) -> &Client {
        self.object()
    }

    pub fn client_mut(&mut self) -> &mut Client {
        self.object.as_mut().expect("connection present until drop")
    }

    /// Prepares `sql` once per connection and reuses it afterwards.
    pub async fn prepare(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        self.object().prepare_cached(sql).await
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        if self.in_transaction {
            if let Some(object) = self.object.take() {
                // Out of the pool and dropped: deadpool's wrapper ends the connection's task, which closes
                // the socket.
                drop(Object::take(object));
            }
        }
    }
}

/// Pool occupancy, for /health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub max_size: usize,
    pub in_use: usize,
    pub idle: usize,
    pub waiting: usize,
}

impl Pool {
    pub fn new(
        config: tokio_postgres::Config,
        tls: PgTls,
        max_size: usize,
        acquire_timeout: Duration,
    ) -> Pool {
        // `Fast`: a connection is checked only for being closed when handed out again; the store's own
        // rule (`in_transaction`) keeps a connection in an unknown state out of the pool.
        let manager = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = Manager::from_config(config.clone(), tls.clone(), manager);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(max_size.max(1))
            // The most recently used connection first: the warmest caches, and idle ones stay idle.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(acquire_timeout),
                create: Some(acquire_timeout),
                recycle: None,
            })
            .build()
            .expect("a runtime is given, as timeouts need");
        Pool { pool, config, tls }
    }

    pub async fn get(&self) -> Result<PooledConnection, StoreError> {
        match self.pool.get().await {
            Ok(object) => Ok(PooledConnection {
                object: Some(object),
                in_transaction: false,
            }),
            Err(error) => Err(pool_error(error)),
        }
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    pub fn status(&self) -> PoolStatus {
        let status = self.pool.status();
        PoolStatus {
            max_size: status.max_size,
            in_use: status.size - status.available,
            idle: status.available,
            waiting: status.waiting,
        }
    }

    /// Drops idle connections and refuses new loans; used at shutdown.
    pub fn close(&self) {
        self.pool.close();
    }
}

/// What a failed loan means to the caller: a full pool is `Saturated` (503 + Retry-After), anything else
/// the database being unavailable.
fn pool_error(error: PoolError) -> StoreError {
    match error {
        PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => StoreError::Saturated,
        PoolError::Timeout(_) => {
            StoreError::Unavailable(Cause::new("timed out connecting to PostgreSQL"))
        }
        PoolError::Closed => StoreError::Unavailable(Cause::new("connection pool is closed")),
        PoolError::Backend(e) => {
            // Kept as the source, so that start-up can tell a refusal from a database still starting.
            // tokio-postgres' own text ("error performing TLS handshake") leaves out why.
            let why = std::error::Error::source(&e)
                .map(|source| format!(": {source}"))
                .unwrap_or_default();
            StoreError::Unavailable(Cause {
                message: format!("cannot connect to PostgreSQL: {e}{why}"),
                source: Some(Arc::new(e)),
            })
        }
        other => StoreError::Unavailable(Cause {
            message: format!("connection pool: {other}"),
            source: None,
        }),
    }
}

/// True when connecting failed for a reason that retrying does not fix: TLS refused (an untrusted or
/// misnamed certificate), TLS required but not offered, or PostgreSQL refused the login (SQLSTATE class 28:
/// `pg_hba.conf`, password). A socket that failed or a database still starting is not a refusal.
pub(super) fn connection_refused(error: &tokio_postgres::Error) -> bool {
    if let Some(code) = error.code() {
        return code.code().starts_with("28");
    }
    // tokio-postgres reports socket failures with the `io::Error` as the source, and TLS and configuration
    // problems with a source of another type.
    TlsRefused::is_cause_of(error)
        || std::error::Error::source(error).is_some_and(|source| !source.is::<std::io::Error>())
}
