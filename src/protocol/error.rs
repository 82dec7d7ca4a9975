//! The error codes of the API, in one place: every stable `error` string a client may branch on
//! (`{"error":"<code>","message":"<text>"}`, SPEC §12 and `openapi.yaml`), with the HTTP status it is
//! answered with and whether the client is asked to retry. The messages are for people and are not part of
//! the contract; these codes are.

use hyper::StatusCode;

/// One error code of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ErrorCode {
    // 400: the request is malformed; the message names the field or the change index.
    InvalidBody,
    InvalidJson,
    InvalidChange,
    InvalidNumber,
    InvalidSince,
    UnsupportedSchemaVersion,
    InvalidQuery,
    MissingParameter,
    InvalidCollection,
    InvalidLimit,
    InvalidLastEventId,
    InvalidAppId,
    InvalidClientId,
    InvalidContentLength,
    BodyReadFailed,
    InvalidUpgrade,
    /// The database refused a value (SQLSTATE class 22); nothing was written.
    InvalidValue,
    // 401: the bearer token.
    MissingToken,
    MalformedToken,
    UnsupportedAlgorithm,
    UnknownKey,
    BadSignature,
    TokenExpired,
    TokenNotYetValid,
    MissingSubject,
    WrongIssuer,
    WrongAudience,
    // 402
    SyncInactive,
    // 404, 405, 408, 413, 415, 426
    NotFound,
    MethodNotAllowed,
    BodyTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    UpgradeRequired,
    // 429: this user has too much in flight.
    TooManyRequests,
    TooManyConnections,
    // 500: a bug, logged.
    InternalError,
    // 503: retry shortly.
    Overloaded,
    TooManyUnauthenticatedSockets,
    KeysUnavailable,
    DatabaseUnavailable,
    DatabaseSaturated,
    DatabaseContention,
}

impl ErrorCode {
    /// The code on the wire.
    pub(crate) const fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidBody => "invalid_body",
            InvalidJson => "invalid_json",
            InvalidChange => "invalid_change",
            InvalidNumber => "invalid_number",
            InvalidSince => "invalid_since",
            UnsupportedSchemaVersion => "unsupported_schema_version",
            InvalidQuery => "invalid_query",
            MissingParameter => "missing_parameter",
            InvalidCollection => "invalid_collection",
            InvalidLimit => "invalid_limit",
            InvalidLastEventId => "invalid_last_event_id",
            InvalidAppId => "invalid_app_id",
            InvalidClientId => "invalid_client_id",
            InvalidContentLength => "invalid_content_length",
            BodyReadFailed => "body_read_failed",
            InvalidUpgrade => "invalid_upgrade",
            InvalidValue => "invalid_value",
            MissingToken => "missing_token",
            MalformedToken => "malformed_token",
            UnsupportedAlgorithm => "unsupported_algorithm",
            UnknownKey => "unknown_key",
            BadSignature => "bad_signature",
            TokenExpired => "token_expired",
            TokenNotYetValid => "token_not_yet_valid",
            MissingSubject => "missing_subject",
            WrongIssuer => "wrong_issuer",
            WrongAudience => "wrong_audience",
            SyncInactive => "sync_inactive",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            BodyTimeout => "body_timeout",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            UpgradeRequired => "upgrade_required",
            TooManyRequests => "too_many_requests",
            TooManyConnections => "too_many_connections",
            InternalError => "internal_error",
            Overloaded => "overloaded",
            TooManyUnauthenticatedSockets => "too_many_unauthenticated_sockets",
            KeysUnavailable => "keys_unavailable",
            DatabaseUnavailable => "database_unavailable",
            DatabaseSaturated => "database_saturated",
            DatabaseContention => "database_contention",
        }
    }

    /// The status it is answered with.
    pub(crate) fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            InvalidBody
            | InvalidJson
            | InvalidChange
            | InvalidNumber
            | InvalidSince
            | UnsupportedSchemaVersion
            | InvalidQuery
            | MissingParameter
            | InvalidCollection
            | InvalidLimit
            | InvalidLastEventId
            | InvalidAppId
            | InvalidClientId
            | InvalidContentLength
            | BodyReadFailed
            | InvalidUpgrade
            | InvalidValue => StatusCode::BAD_REQUEST,
            MissingToken | MalformedToken | UnsupportedAlgorithm | UnknownKey | BadSignature
            | TokenExpired | TokenNotYetValid | MissingSubject | WrongIssuer | WrongAudience => {
                StatusCode::UNAUTHORIZED
            }
            SyncInactive => StatusCode::PAYMENT_REQUIRED,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            TooManyRequests | TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            Overloaded
            | TooManyUnauthenticatedSockets
            | KeysUnavailable
            | DatabaseUnavailable
            | DatabaseSaturated
            | DatabaseContention => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `Retry-After` in seconds, for the codes that ask the client to come back shortly: every 503, and a
    /// user's requests over their share (a user's sockets and streams over theirs are not retried soon).
    pub(crate) fn retry_after(self) -> Option<u32> {
        match self {
            ErrorCode::TooManyRequests => Some(1),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        }
    }
}

/// Compares with the code on the wire.
impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
