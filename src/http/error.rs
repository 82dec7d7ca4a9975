//! HTTP errors: the one place where failures become status codes and `{"error","message"}` bodies.

use hyper::StatusCode;

use crate::auth::AuthError;
use crate::protocol::ProtocolError;
use crate::realtime::Refusal;
use crate::store::StoreError;

/// An error response. `code` is the stable API clients may branch on; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 503 and 429.
    pub retry_after: Option<u32>,
    /// For 405.
    pub allow: Option<&'static str>,
    /// The connection is closed after this answer (the request's body was not, or not wholly, read).
    pub close: bool,
    /// What went wrong underneath, for the log line of this request (never sent to the client).
    pub detail: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
            close: false,
            detail: None,
        }
    }

    /// 429: this user has too much in flight; retry shortly.
    pub fn too_many_requests(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
        }
    }

    /// 413 for a body over `cap` bytes; the connection closes after it.
    pub fn payload_too_large(cap: usize) -> ApiError {
        ApiError {
            close: true,
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body exceeds the limit of {cap} bytes"),
            )
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.code, "message": self.message }).to_string()
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> ApiError {
        ApiError::bad_request(e.code, e.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::KeysUnavailable => ApiError::unavailable(
                e.code(),
                format!("{e}; tokens cannot be verified right now"),
            ),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(_) => ApiError::unavailable(
                "database_unavailable",
                "the database is unavailable; retry shortly",
            ),
            StoreError::Saturated => {
                ApiError::unavailable("database_saturated", "the server is busy; retry shortly")
            }
            StoreError::Contention(_) => ApiError::unavailable(
                "database_contention",
                "the write collided with another; retry shortly",
            ),
            StoreError::Rejected(why) => ApiError::bad_request(
                "invalid_value",
                format!(
                    "the database refused a value of this request ({}); nothing was written",
                    why.database_message().unwrap_or("data exception")
                ),
            ),
            // Logged by the request's own log line (with its request id), which carries `detail`.
            StoreError::Internal(why) => ApiError {
                detail: Some(format!("database error: {why}")),
                ..ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
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
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "this endpoint speaks WebSocket only",
            ),
            Refusal::InvalidUpgrade(why) => ApiError::bad_request(
                "invalid_upgrade",
                format!("WebSocket handshake failed: {why}"),
            ),
            Refusal::TooManyUnauthenticatedSockets => ApiError::unavailable(
                "too_many_unauthenticated_sockets",
                "too many WebSockets are waiting to authenticate; retry shortly",
            ),
            Refusal::TooManyStreams => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "too many streams",
            ),
            Refusal::InvalidLastEventId => {
                ApiError::bad_request("invalid_last_event_id", "Last-Event-ID is not a cursor")
            }
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
