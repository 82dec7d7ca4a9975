//! The HTTP layer: request in, response out.
//!
//! `handle` is the service function of every connection. It routes (`router`), authenticates, reads the
//! body within its cap, calls the store and turns every failure into a JSON error (`error`). CORS headers
//! are added here, to every response, so that browsers also see error bodies.

pub mod error;
mod response;
pub mod router;

use std::convert::Infallible;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::auth::{self, Claims};
use crate::clock;
use crate::protocol::{self, time, ErrorCode};
use crate::realtime::{notify, sse, ws, Interest};
use crate::state::{body_budget, per_user, Shared};
pub use error::ApiError;
pub use response::Body;
use response::{cors, error_response, json_response, preflight};
use router::{Route, Routing};

/// Longest accepted `X-Client-Id`, in bytes.
const MAX_CLIENT_ID_BYTES: usize = 512;

pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let request_id = format!(
        "{}-{}",
        shared.instance_id,
        REQUEST_IDS.fetch_add(1, Ordering::Relaxed)
    );
    let origin = request.headers().get(header::ORIGIN).cloned();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let routing = router::route(&method, &path);
    let route = router::label(&routing);

    // Health and metrics stay answerable when the server is saturated: that is when they matter.
    let exempt = matches!(route, "health" | "metrics");
    let permit = if exempt {
        None
    } else {
        shared.request_permits.clone().try_acquire_owned().ok()
    };
    let outcome = if exempt || permit.is_some() {
        dispatch(&shared, routing, request).await
    } else {
        shared.metrics.overloaded.fetch_add(1, Ordering::Relaxed);
        Err(ApiError::new(
            ErrorCode::Overloaded,
            "the server is handling too many requests; retry shortly",
        ))
    };
    drop(permit);
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            if error.status.is_server_error() {
                let mut fields = vec![
                    ("requestId", request_id.as_str().into()),
                    ("method", method.as_str().into()),
                    ("path", path.as_str().into()),
                    ("status", error.status.as_u16().into()),
                    ("error", error.code.into()),
                ];
                if let Some(detail) = &error.detail {
                    // For a database error: PostgreSQL's message and SQLSTATE (never values or tokens).
                    fields.push(("detail", detail.as_str().into()));
                }
                if error.status == StatusCode::INTERNAL_SERVER_ERROR {
                    crate::log::error("request failed", &fields);
                } else {
                    crate::log::warn("request failed", &fields);
                }
            }
            error_response(&error)
        }
    };
    cors(
        &shared.config.cors_origins,
        origin.as_ref(),
        response.headers_mut(),
    );
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let elapsed = started.elapsed();
    shared
        .metrics
        .request(route, response.status().as_u16(), elapsed);
    if crate::log::enabled(crate::log::Level::Debug) {
        crate::log::debug(
            "request",
            &[
                ("requestId", request_id.as_str().into()),
                ("method", method.as_str().into()),
                ("route", route.into()),
                ("status", response.status().as_u16().into()),
                ("micros", (elapsed.as_micros() as u64).into()),
            ],
        );
    }
    Ok(response)
}

/// Request ids: this instance's id and a sequence number.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

async fn dispatch(
    shared: &Arc<Shared>,
    routing: Routing,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let route = match routing {
        Routing::Found(route) => route,
        Routing::Preflight { allow } => return Ok(preflight(allow)),
        Routing::MethodNotAllowed { allow } => {
            return Err(ApiError {
                allow: Some(allow),
                ..ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    format!("{} is not allowed here; allowed: {allow}", request.method()),
                )
            })
        }
        Routing::InvalidAppId => {
            return Err(ApiError::new(
                ErrorCode::InvalidAppId,
                "appId must be 1-64 characters of A-Z a-z 0-9 _ . -",
            ))
        }
        Routing::NotFound => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no route for {}", request.uri().path()),
            ))
        }
    };
    match route {
        Route::Push { app: app_id } => push(shared, request, &app_id).await,
        Route::Pull { app: app_id } => pull(shared, request, &app_id).await,
        Route::AppStream { app: app_id } => stream(shared, request, sse::Scope::App(app_id)).await,
        Route::UnifiedStream => stream(shared, request, sse::Scope::Unified).await,
        Route::UnifiedSocket => socket(shared, request, Interest::Apps(None)),
        Route::AppSocket { app: app_id } => socket(shared, request, Interest::App(app_id)),
        Route::Health => health(shared).await,
        Route::Metrics => {
            let text = crate::metrics::render(&shared.metrics, &shared.metrics_snapshot());
            let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
    }
}

async fn push(
    shared: &Shared,
    request: Request<Incoming>,
    app_id: &str,
) -> Result<Response<Body>, ApiError> {
    let claims = authenticate(shared, request.headers()).await?;
    let _slot = user_slot(shared, &claims.sub)?;
    gate(shared, &claims.sub).await?;
    let header_device = client_id_header(request.headers())?;
    check_content_type(request.headers())?;
    // Held until the response is built: a push's memory is a multiple of its body until then.
    let mut reservation = shared.body_budget.reservation(&claims.sub);
    let body = read_body(
        request,
        shared.config.max_body_bytes,
        shared.config.body_read_timeout,
        &mut reservation,
    )
    .await
    .map_err(|refused| refused.into_api_error(shared))?;
    // A large batch keeps the body (its changes are parsed again chunk by chunk); a small one drops it.
    let changeset = protocol::parse_changeset(body)?;
    let device = header_device.or_else(|| changeset.client_id.clone());
    let tables = &changeset.tables;
    let hint: crate::store::Hint = {
        let (instance, user, app_id) = (
            shared.instance_id.clone(),
            claims.sub.clone(),
            app_id.to_owned(),
        );
        let (tables, device) = (tables.clone(), device.clone());
        std::sync::Arc::new(move |stamp| {
            notify::hint_payload(&instance, &user, &app_id, &tables, device.as_deref(), stamp)
        })
    };
    let response = shared
        .store
        .push(
            &claims.sub,
            app_id,
            device.as_deref(),
            &changeset,
            shared.config.pull_page_size,
            (!tables.is_empty()).then_some(hint),
        )
        .await?;
    let metrics = &shared.metrics;
    metrics
        .changes_pushed
        .fetch_add(changeset.changes.len() as u64, Ordering::Relaxed);
    metrics
        .push_batch_size
        .observe(changeset.changes.len() as f64);
    metrics
        .conflicts
        .fetch_add(response.conflicts.len() as u64, Ordering::Relaxed);
    metrics
        .changes_pulled
        .fetch_add(response.server_changes.len() as u64, Ordering::Relaxed);
    // Committed: tell this instance's other connections now (other instances hear it from PostgreSQL).
    if !tables.is_empty() {
        shared
            .hub
            .notify(&claims.sub, app_id, Some(tables), device.as_deref());
    }
    Ok(json_response(StatusCode::OK, &response))
}

async fn pull(
    shared: &Shared,
    request: Request<Incoming>,
    app_id: &str,
) -> Result<Response<Body>, ApiError> {
    let claims = authenticate(shared, request.headers()).await?;
    let _slot = user_slot(shared, &claims.sub)?;
    gate(shared, &claims.sub).await?;
    let device = client_id_header(request.headers())?;
    let query = protocol::parse_pull_query(
        request.uri().query(),
        shared.config.pull_page_size,
        shared.config.pull_max_page_size,
    )?;
    let response = shared
        .store
        .pull(&claims.sub, app_id, device.as_deref(), &query)
        .await?;
    shared
        .metrics
        .changes_pulled
        .fetch_add(response.server_changes.len() as u64, Ordering::Relaxed);
    Ok(json_response(StatusCode::OK, &response))
}

async fn stream(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    scope: sse::Scope,
) -> Result<Response<Body>, ApiError> {
    let claims = authenticate(shared, request.headers()).await?;
    let _slot = user_slot(shared, &claims.sub)?;
    gate(shared, &claims.sub).await?;
    let device = client_id_header(request.headers())?;
    let expires = ws::token_deadline(&claims, shared.config.ws_token_leeway);
    let response = sse::open(shared.clone(), request, scope, claims.sub, device, expires).await?;
    Ok(response.map(BodyExt::boxed))
}

/// A WebSocket upgrade: authenticated in-band, after the 101.
fn socket(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    interest: Interest,
) -> Result<Response<Body>, ApiError> {
    let response = ws::upgrade(shared.clone(), request, interest)?;
    Ok(response.map(BodyExt::boxed))
}

async fn health(shared: &Shared) -> Result<Response<Body>, ApiError> {
    let database =
        tokio::time::timeout(std::time::Duration::from_secs(2), shared.store.ping()).await;
    let database_ok = matches!(database, Ok(Ok(())));
    let pool = shared.store.pool_status();
    let (connections, users) = shared.hub.counts(None);
    let body = serde_json::json!({
        "status": if database_ok { "ok" } else { "degraded" },
        "service": "mana-sync",
        "timestamp": time::format_millis(clock::now_micros()),
        "connections": connections,
        "users": users,
        "httpConnections": shared.open_connections(),
        "database": if database_ok { "ok" } else { "unreachable" },
        "pool": { "size": pool.max_size, "inUse": pool.in_use, "idle": pool.idle, "waiting": pool.waiting },
    });
    let status = if database_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(status, &body))
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
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
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
enum BodyError {
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
    fn into_api_error(self, shared: &Shared) -> ApiError {
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
async fn read_body(
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
