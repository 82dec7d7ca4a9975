//! What a request must pass before a handler works on it: `Caller::authorize` (bearer token, claims, the
//! user's request slot, the billing gate, `X-Client-Id`), the content type, and the body within its cap,
//! its time and the budget for large bodies.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::Request;

use super::ApiError;
use crate::auth::{self, Claims};
use crate::protocol::ErrorCode;
use crate::state::{body_budget, per_user, Shared};

/// Longest accepted `X-Client-Id`, in bytes.
const MAX_CLIENT_ID_BYTES: usize = 512;

/// Who a request is for, once it may proceed: the verified claims, one of the user's request slots (held
/// while this value lives) and the device named by `X-Client-Id`.
pub(super) struct Caller {
    pub(super) claims: Claims,
    pub(super) slot: per_user::Slot,
    pub(super) device: Option<String>,
}

impl Caller {
    /// The checks every data route makes before it reads anything else, in this order: the bearer token
    /// and its claims (401), the user's request slots (429), the billing gate (402), `X-Client-Id` (400).
    pub(super) async fn authorize(
        shared: &Shared,
        headers: &HeaderMap,
    ) -> Result<Caller, ApiError> {
        let claims = authenticate(shared, headers).await?;
        let slot = user_slot(shared, &claims.sub)?;
        gate(shared, &claims.sub).await?;
        let device = client_id_header(headers)?;
        Ok(Caller {
            claims,
            slot,
            device,
        })
    }
}

/// One of the user's request slots, held until the handler returns (a stream's body outlives it), so one
/// user's requests hold at most their share of the server's slots, however slowly their bodies arrive.
fn user_slot(shared: &Shared, user: &str) -> Result<per_user::Slot, ApiError> {
    shared.requests_per_user.enter(user).ok_or_else(|| {
        ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "more than {} requests of this account are in flight; retry shortly",
                shared.config.max_requests_per_user
            ),
        )
    })
}

/// The billing gate (SPEC §9): 402 for users whose sync is inactive; failures of the billing service let
/// the request through.
async fn gate(shared: &Shared, user: &str) -> Result<(), ApiError> {
    match &shared.billing {
        Some(billing) if billing.check(user).await == crate::billing::Verdict::Inactive => {
            Err(ApiError::new(
                ErrorCode::SyncInactive,
                "sync is not active for this account",
            ))
        }
        _ => Ok(()),
    }
}

async fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let value = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::from(auth::AuthError::Malformed(
                "Authorization header is not ASCII".into(),
            ))
        })?),
    };
    let token = auth::bearer_token(value)?;
    let claims = shared.auth.verify(token).await?;
    // The user id ends up in SQL parameters and lock keys; keep it to something PostgreSQL can store.
    // Nor control characters (CR, LF, ESC, …): it also ends up in log lines and outbound URLs.
    if claims.sub.len() > 255 || claims.sub.chars().any(char::is_control) {
        return Err(auth::AuthError::Malformed(
            "sub is longer than 255 bytes or contains a control character".into(),
        )
        .into());
    }
    Ok(claims)
}

fn client_id_header(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("x-client-id") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidClientId,
                "X-Client-Id must be printable ASCII",
            )
        })?
        .trim();
    if text.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorCode::InvalidClientId,
            "X-Client-Id contains control characters",
        ));
    }
    if text.len() > MAX_CLIENT_ID_BYTES {
        return Err(ApiError::new(
            ErrorCode::InvalidClientId,
            format!("X-Client-Id is longer than {MAX_CLIENT_ID_BYTES} bytes"),
        ));
    }
    Ok(Some(text.to_owned()).filter(|t| !t.is_empty()))
}

/// JSON bodies only. A missing Content-Type is tolerated (today's server never checked it).
pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type must be application/json, not {essence:?}"),
        ))
    }
}

/// Reads the whole body, refusing more than `cap` bytes: a declared length over the cap is refused before
/// reading anything, and a chunked body is cut off as soon as it grows past the cap.
/// How much of an oversized body is read and thrown away so that the client, which may be writing it all
/// before it reads anything (browsers' `fetch`, Node), gets to read the 413 instead of a broken pipe: up
/// to this many bytes in all, within `DRAIN_TIME`, while data keeps coming (`DRAIN_IDLE`). Larger, slower
/// or stalled bodies are cut off.
const DRAIN_FACTOR: usize = 2;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads a request body of at most `cap` bytes within `timeout` (408 `body_timeout` otherwise). A body over
/// the cap — declared or found while reading a chunked one — answers 413 `payload_too_large` after the
/// rest is drained (never kept) up to `DRAIN_FACTOR` × cap, and the connection is closed after it.
/// Why a body was not read.
pub(super) enum BodyError {
    Api(ApiError),
    /// Over the budget for large bodies (`body_budget`); the body was drained.
    Refused(body_budget::Refused),
}

impl From<ApiError> for BodyError {
    fn from(error: ApiError) -> BodyError {
        BodyError::Api(error)
    }
}

impl BodyError {
    pub(super) fn into_api_error(self, shared: &Shared) -> ApiError {
        match self {
            BodyError::Api(error) => error,
            BodyError::Refused(body_budget::Refused::User) => ApiError::new(ErrorCode::TooManyRequests, format!(
                "this account has more than {} bytes of large request bodies in flight; retry shortly",
                shared.body_budget.per_user()
            )),
            BodyError::Refused(body_budget::Refused::Server) => ApiError::new(ErrorCode::Overloaded,
                "the server is handling too many large request bodies; retry shortly",
            ),
        }
    }
}

/// Reads the whole body, within `cap` and `timeout`, counting it against `reservation` once it is large
/// (declared: before reading; chunked: as it arrives). Refused and oversized bodies are drained first, so
/// that a client that writes its whole body before reading can read the answer.
pub(super) async fn read_body(
    request: Request<Incoming>,
    cap: usize,
    timeout: std::time::Duration,
    reservation: &mut body_budget::Reservation,
) -> Result<Bytes, BodyError> {
    let drain_limit = cap.saturating_mul(DRAIN_FACTOR) as u64;
    let declared = match request.headers().get(header::CONTENT_LENGTH) {
        None => None,
        Some(length) => Some(
            length
                .to_str()
                .ok()
                .and_then(|l| l.parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidContentLength,
                        "Content-Length is not a number",
                    )
                })?,
        ),
    };
    let mut body = request.into_body();
    if let Some(length) = declared.filter(|&length| length > cap as u64) {
        if length <= drain_limit {
            drain(&mut body, drain_limit).await;
        }
        return Err(ApiError::payload_too_large(cap).into());
    }
    if let Some(length) = declared {
        if let Err(refused) = reservation.cover(length as usize) {
            drain(&mut body, drain_limit).await;
            return Err(BodyError::Refused(refused));
        }
    }
    let read = async {
        let mut collected = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                ApiError::new(
                    ErrorCode::BodyReadFailed,
                    "the request body could not be read",
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if collected.len() + data.len() > cap {
                    return Ok(Err(None));
                }
                if let Err(refused) = reservation.cover(collected.len() + data.len()) {
                    return Ok(Err(Some(refused)));
                }
                collected.extend_from_slice(&data);
            }
        }
        Ok(Ok(collected.freeze()))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        Ok(Ok(Err(refused))) => {
            let seen = cap as u64; // at most; the drain bound only needs to be generous
            drain(&mut body, drain_limit.saturating_sub(seen)).await;
            Err(match refused {
                None => ApiError::payload_too_large(cap).into(),
                Some(refused) => BodyError::Refused(refused),
            })
        }
        Ok(Err(error)) => Err(BodyError::Api(error)),
        Err(_) => Err(ApiError::new(
            ErrorCode::BodyTimeout,
            "the request body did not arrive in time",
        )
        .into()),
    }
}

/// Reads and discards up to `limit` more bytes of `body` within `DRAIN_TIME`, while frames keep coming.
async fn drain(body: &mut Incoming, limit: u64) {
    let discard = async {
        let mut seen = 0u64;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(DRAIN_IDLE, body.frame()).await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > limit {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}
