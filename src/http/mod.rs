//! The HTTP layer: request in, response out.
//!
//! `handle` is the service function of every connection: request id, the limit of requests in flight,
//! routing (`router`) to a handler (`handlers`), which authorizes its caller and reads the body within its
//! cap (`request`); every failure becomes a JSON error (`error`). CORS headers are added here, to every
//! response (`response`), so that browsers also see error bodies.

pub mod error;
mod handlers;
mod request;
mod response;
pub mod router;

use std::convert::Infallible;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::metrics::RouteLabel;
use crate::protocol::ErrorCode;
use crate::realtime::{sse, Interest};
use crate::state::Shared;
pub(crate) use error::ApiError;
pub(crate) use response::Body;
use response::{cors, error_response, preflight};
use router::{Route, Routing};

pub(crate) async fn handle(
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

    let outcome = dispatch_with_permit(&shared, route, routing, request).await;
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            if error.status.is_server_error() {
                log_failure(&error, &request_id, &method, &path);
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
        log_request(
            &request_id,
            &method,
            route.as_str(),
            response.status(),
            elapsed,
        );
    }
    Ok(response)
}

/// Request ids: this instance's id and a sequence number.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// Dispatches the request while holding one of the request permits, or refuses it as overloaded.
async fn dispatch_with_permit(
    shared: &Arc<Shared>,
    route: RouteLabel,
    routing: Routing,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    // Health and metrics stay answerable when the server is saturated: that is when they matter.
    let exempt = matches!(route, RouteLabel::Health | RouteLabel::Metrics);
    let permit = if exempt {
        None
    } else {
        shared.request_permits.clone().try_acquire_owned().ok()
    };
    let outcome = if exempt || permit.is_some() {
        dispatch(shared, routing, request).await
    } else {
        shared.metrics.overloaded.fetch_add(1, Ordering::Relaxed);
        Err(ApiError::new(
            ErrorCode::Overloaded,
            "the server is handling too many requests; retry shortly",
        ))
    };
    drop(permit);
    outcome
}

/// Logs a request answered with a 5xx status: an error for 500, a warning otherwise.
fn log_failure(error: &ApiError, request_id: &str, method: &Method, path: &str) {
    let mut fields = vec![
        ("requestId", request_id.into()),
        ("method", method.as_str().into()),
        ("path", path.into()),
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

/// The debug line of every request.
fn log_request(
    request_id: &str,
    method: &Method,
    route: &str,
    status: StatusCode,
    elapsed: std::time::Duration,
) {
    crate::log::debug(
        "request",
        &[
            ("requestId", request_id.into()),
            ("method", method.as_str().into()),
            ("route", route.into()),
            ("status", status.as_u16().into()),
            ("micros", (elapsed.as_micros() as u64).into()),
        ],
    );
}

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
        Route::Push { app: app_id } => handlers::push(shared, request, &app_id).await,
        Route::Pull { app: app_id } => handlers::pull(shared, request, &app_id).await,
        Route::AppStream { app: app_id } => {
            handlers::stream(shared, request, sse::Scope::App(app_id)).await
        }
        Route::UnifiedStream => handlers::stream(shared, request, sse::Scope::Unified).await,
        Route::UnifiedSocket => handlers::socket(shared, request, Interest::Apps(None)),
        Route::AppSocket { app: app_id } => {
            handlers::socket(shared, request, Interest::App(app_id))
        }
        Route::Health => handlers::health(shared).await,
        Route::Metrics => handlers::metrics(shared),
    }
}
