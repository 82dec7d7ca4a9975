//! What can go wrong in the store, classified for the HTTP layer by SQLSTATE (never by message text).

use std::sync::Arc;

use tokio_postgres::error::SqlState;

use super::pool;

#[derive(Debug, Clone)]
pub enum StoreError {
    /// PostgreSQL cannot be reached or the connection broke: retry later.
    Unavailable(Cause),
    /// Every pooled connection stayed busy for the whole acquire timeout: retry later.
    Saturated,
    /// The database aborted the transaction to resolve contention (deadlock, serialization): retry.
    Contention(Cause),
    /// The database refused a value the client sent (SQLSTATE class 22, data exception): the client's
    /// fault, nothing was written, a retry fails the same way.
    Rejected(Cause),
    /// Anything else: a bug or a broken database, never the client's fault.
    Internal(Cause),
}

/// What went wrong underneath a `StoreError`: a description, and PostgreSQL's error when there was one
/// (kept as the error's `source`, with its SQLSTATE).
#[derive(Debug, Clone)]
pub struct Cause {
    pub(super) message: String,
    pub(super) source: Option<Arc<tokio_postgres::Error>>,
}

impl Cause {
    pub(crate) fn new(message: impl Into<String>) -> Cause {
        Cause {
            message: message.into(),
            source: None,
        }
    }

    /// The SQLSTATE PostgreSQL reported, if any.
    pub(crate) fn code(&self) -> Option<&SqlState> {
        self.source.as_deref().and_then(tokio_postgres::Error::code)
    }

    /// True when a connection was refused for good (TLS refused, login refused), not merely unreachable.
    pub(crate) fn is_connection_refused(&self) -> bool {
        self.source.as_deref().is_some_and(pool::connection_refused)
    }

    /// PostgreSQL's own message (without our prefix), if it sent one.
    pub(crate) fn database_message(&self) -> Option<&str> {
        self.source
            .as_deref()
            .and_then(tokio_postgres::Error::as_db_error)
            .map(|e| e.message())
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match self.code() {
            Some(code) => write!(f, " (SQLSTATE {})", code.code()),
            None => Ok(()),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "database unavailable: {why}"),
            StoreError::Saturated => f.write_str("database connection pool saturated"),
            StoreError::Contention(why) => write!(f, "transaction aborted by contention: {why}"),
            StoreError::Rejected(why) => write!(f, "the database refused a value: {why}"),
            StoreError::Internal(why) => write!(f, "database error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unavailable(why)
            | StoreError::Contention(why)
            | StoreError::Rejected(why)
            | StoreError::Internal(why) => why.source.as_deref().map(|e| e as _),
            StoreError::Saturated => None,
        }
    }
}

/// SQLSTATEs that mean "the server is going away, cannot take us now, or took too long" (besides class 08,
/// connection exceptions).
const UNAVAILABLE_STATES: [SqlState; 7] = [
    SqlState::QUERY_CANCELED,
    SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
    SqlState::ADMIN_SHUTDOWN,
    SqlState::CRASH_SHUTDOWN,
    SqlState::CANNOT_CONNECT_NOW,
    SqlState::TOO_MANY_CONNECTIONS,
    SqlState::CONFIGURATION_LIMIT_EXCEEDED,
];
/// SQLSTATEs with which PostgreSQL aborts a transaction to resolve contention; a retry may succeed.
const CONTENTION_STATES: [SqlState; 3] = [
    SqlState::T_R_SERIALIZATION_FAILURE,
    SqlState::T_R_DEADLOCK_DETECTED,
    SqlState::LOCK_NOT_AVAILABLE,
];

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        let classify = |error: &tokio_postgres::Error| -> fn(Cause) -> StoreError {
            if error.is_closed() {
                return StoreError::Unavailable;
            }
            match error.code() {
                Some(code)
                    if code.code().starts_with("08") || UNAVAILABLE_STATES.contains(code) =>
                {
                    StoreError::Unavailable
                }
                Some(code) if CONTENTION_STATES.contains(code) => StoreError::Contention,
                Some(code) if code.code().starts_with("22") => StoreError::Rejected,
                Some(_) => StoreError::Internal,
                // No SQLSTATE: the socket failed (unavailable) or we sent or read something wrong (a bug).
                None if std::error::Error::source(error)
                    .is_some_and(|source| source.is::<std::io::Error>()) =>
                {
                    StoreError::Unavailable
                }
                None => StoreError::Internal,
            }
        };
        let variant = classify(&error);
        // PostgreSQL's message without its DETAIL (which may quote values); the SQLSTATE is added by
        // `Display`.
        let message = match error.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => error.to_string(),
        };
        variant(Cause {
            message,
            source: Some(Arc::new(error)),
        })
    }
}
