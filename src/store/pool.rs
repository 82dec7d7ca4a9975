//! A small bounded pool of PostgreSQL connections.
//!
//! Hand-written because what it must do is short and specific: at most `max_size` connections, a waiter
//! gives up after `acquire_timeout` (the HTTP layer turns that into 503 + Retry-After instead of letting an
//! unbounded queue build up), broken connections are dropped instead of being handed out again, and every
//! connection keeps its own prepared statements.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Statement};

use crate::client_tls::{PgTls, TlsRefused};

use super::{Cause, StoreError};

pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    /// TLS as `DATABASE_URL`'s `sslmode` asks, for every connection of the pool and the dedicated ones.
    tls: PgTls,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    max_size: usize,
    acquire_timeout: Duration,
    waiting: AtomicUsize,
}

/// One open connection with its statement cache.
pub struct Connection {
    pub client: Client,
    statements: HashMap<&'static str, Statement>,
    /// Set while a transaction begun by hand (a pipelined `BEGIN`) may still be open. A connection given
    /// back in that state (its request was cancelled mid-way) is closed instead of reused, which makes
    /// PostgreSQL roll the transaction back and release its locks.
    pub(super) in_transaction: bool,
}

impl Connection {
    /// Prepares `sql` once per connection and reuses it afterwards.
    pub async fn prepare(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// A connection on loan; it goes back to the pool when dropped, unless it broke.
pub struct PooledConnection {
    connection: Option<Connection>,
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PooledConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.connection
            .as_ref()
            .expect("connection present until drop")
    }
}

impl std::ops::DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        self.connection
            .as_mut()
            .expect("connection present until drop")
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            if !connection.client.is_closed() && !connection.in_transaction {
                self.inner.idle.lock().push(connection);
            }
        }
    }
}

/// One waiter in the `waiting` gauge, for as long as it exists.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicUsize) -> Waiting<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
        let max_size = max_size.max(1);
        Pool {
            inner: Arc::new(Inner {
                config,
                tls,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(max_size)),
                max_size,
                acquire_timeout,
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    pub async fn get(&self) -> Result<PooledConnection, StoreError> {
        let inner = &self.inner;
        // Counted by a guard, so that a waiter whose request is cancelled stops counting too.
        let waiting = Waiting::new(&inner.waiting);
        let permit =
            tokio::time::timeout(inner.acquire_timeout, inner.permits.clone().acquire_owned())
                .await;
        drop(waiting);
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => {
                return Err(StoreError::Unavailable(Cause::new(
                    "connection pool is closed",
                )))
            }
            Err(_elapsed) => return Err(StoreError::Saturated),
        };

        loop {
            let candidate = inner.idle.lock().pop();
            match candidate {
                Some(connection) if connection.client.is_closed() => continue,
                Some(connection) => {
                    return Ok(PooledConnection {
                        connection: Some(connection),
                        inner: inner.clone(),
                        _permit: permit,
                    })
                }
                None => break,
            }
        }

        let connect = inner.config.connect(inner.tls.clone());
        let (client, connection) = match tokio::time::timeout(inner.acquire_timeout, connect).await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                // Kept as the source, so that start-up can tell a refusal from a database still starting.
                // tokio-postgres' own text ("error performing TLS handshake") leaves out why.
                let why = std::error::Error::source(&e)
                    .map(|source| format!(": {source}"))
                    .unwrap_or_default();
                return Err(StoreError::Unavailable(Cause {
                    message: format!("cannot connect to PostgreSQL: {e}{why}"),
                    source: Some(Arc::new(e)),
                }));
            }
            Err(_) => {
                return Err(StoreError::Unavailable(Cause::new(
                    "timed out connecting to PostgreSQL",
                )))
            }
        };
        // The connection future owns the socket; it ends when the client is dropped or the socket fails.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(PooledConnection {
            connection: Some(Connection {
                client,
                statements: HashMap::new(),
                in_transaction: false,
            }),
            inner: inner.clone(),
            _permit: permit,
        })
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.inner.config
    }

    pub fn tls(&self) -> &PgTls {
        &self.inner.tls
    }

    pub fn status(&self) -> PoolStatus {
        let available = self.inner.permits.available_permits();
        PoolStatus {
            max_size: self.inner.max_size,
            in_use: self.inner.max_size - available,
            idle: self.inner.idle.lock().len(),
            waiting: self.inner.waiting.load(Ordering::Relaxed),
        }
    }

    /// Drops idle connections and refuses new loans; used at shutdown.
    pub fn close(&self) {
        self.inner.permits.close();
        self.inner.idle.lock().clear();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancelled_waiter_stops_counting() {
        let config: tokio_postgres::Config = "host=/nonexistent user=nobody".parse().unwrap();
        let pool = Pool::new(config, PgTls::disabled(), 1, Duration::from_secs(60));
        let _taken = pool.inner.permits.clone().try_acquire_owned().unwrap();
        let waiter = {
            let pool = Pool {
                inner: pool.inner.clone(),
            };
            tokio::spawn(async move { pool.get().await.map(drop) })
        };
        while pool.status().waiting == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(pool.status().waiting, 0);
    }
}
