//! HTTP errors: the one place where failures become status codes and `{"error","message"}` bodies. Each
//! failure is given its `ErrorCode`, whose table (`protocol::error`) says the status it is answered with.

use hyper::StatusCode;

use crate::auth::AuthError;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::realtime::Refusal;
use crate::store::StoreError;

/// An error response. `code` is the stable API clients may branch on; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for the codes that ask for a retry (`ErrorCode::retry_after`).
    pub(crate) retry_after: Option<u32>,
    /// For 405.
    pub(crate) allow: Option<&'static str>,
    /// The connection is closed after this answer (the request's body was not, or not wholly, read).
    pub(crate) close: bool,
    /// What went wrong underneath, for the log line of this request (never sent to the client).
    pub(crate) detail: Option<String>,
}

impl ApiError {
    /// An error answered with `code`'s status, and `Retry-After` when the code asks for one.
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: code.status(),
            code: code.as_str(),
            message: message.into(),
            retry_after: code.retry_after(),
            allow: None,
            close: false,
            detail: None,
        }
    }

    /// 413 for a body over `cap` bytes; the connection closes after it.
    pub(crate) fn payload_too_large(cap: usize) -> ApiError {
        ApiError {
            close: true,
            ..ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body exceeds the limit of {cap} bytes"),
            )
        }
    }

    pub(crate) fn body(&self) -> String {
        serde_json::json!({ "error": self.code, "message": self.message }).to_string()
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> ApiError {
        ApiError::new(e.code, e.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let message = match e {
            AuthError::KeysUnavailable => format!("{e}; tokens cannot be verified right now"),
            _ => e.to_string(),
        };
        ApiError::new(e.code(), message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(_) => ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the database is unavailable; retry shortly",
            ),
            StoreError::Saturated => ApiError::new(
                ErrorCode::DatabaseSaturated,
                "the server is busy; retry shortly",
            ),
            StoreError::Contention(_) => ApiError::new(
                ErrorCode::DatabaseContention,
                "the write collided with another; retry shortly",
            ),
            StoreError::Rejected(why) => ApiError::new(
                ErrorCode::InvalidValue,
                format!(
                    "the database refused a value of this request ({}); nothing was written",
                    why.database_message().unwrap_or("data exception")
                ),
            ),
            // Logged by the request's own log line (with its request id), which carries `detail`.
            StoreError::Internal(why) => ApiError {
                detail: Some(format!("database error: {why}")),
                ..ApiError::new(
                    ErrorCode::InternalError,
                    "internal error; it has been logged",
                )
            },
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        match refusal {
            Refusal::UpgradeRequired => ApiError::new(
                ErrorCode::UpgradeRequired,
                "this endpoint speaks WebSocket only",
            ),
            Refusal::InvalidUpgrade(why) => ApiError::new(
                ErrorCode::InvalidUpgrade,
                format!("WebSocket handshake failed: {why}"),
            ),
            Refusal::TooManyUnauthenticatedSockets => ApiError::new(
                ErrorCode::TooManyUnauthenticatedSockets,
                "too many WebSockets are waiting to authenticate; retry shortly",
            ),
            Refusal::TooManyStreams => {
                ApiError::new(ErrorCode::TooManyConnections, "too many streams")
            }
            Refusal::InvalidLastEventId => ApiError::new(
                ErrorCode::InvalidLastEventId,
                "Last-Event-ID is not a cursor",
            ),
            Refusal::Protocol(e) => e.into(),
            Refusal::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Cause;

    #[test]
    fn a_database_error_keeps_its_cause_for_the_log_and_not_for_the_client() {
        let error = ApiError::from(StoreError::Internal(Cause::new("ERROR: boom")));
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.detail.as_deref(), Some("database error: ERROR: boom"));
        assert!(!error.body().contains("boom"), "{}", error.body());
        let refused = ApiError::from(StoreError::Rejected(Cause::new("ERROR: bad")));
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (400, "invalid_value")
        );
    }
}
