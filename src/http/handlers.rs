//! The handlers of the routes: push, pull, the streams and sockets, health and metrics. Each authorizes
//! its caller (`request`), calls the layer below and builds its response (`response`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::request::{check_content_type, read_body, Caller};
use super::response::json_response;
use super::{ApiError, Body};
use crate::clock;
use crate::protocol::{self, time};
use crate::realtime::{notify, sse, ws, Interest};
use crate::state::Shared;

pub(super) async fn push(
    shared: &Shared,
    request: Request<Incoming>,
    app_id: &str,
) -> Result<Response<Body>, ApiError> {
    let caller = Caller::authorize(shared, request.headers()).await?;
    check_content_type(request.headers())?;
    let user = &caller.claims.sub;
    // Held until the response is built: a push's memory is a multiple of its body until then.
    let mut reservation = shared.body_budget.reservation(user);
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
    let device = caller
        .device
        .clone()
        .or_else(|| changeset.client_id.clone());
    let tables = &changeset.tables;
    let hint: crate::store::Hint = {
        let (instance, user, app_id) =
            (shared.instance_id.clone(), user.clone(), app_id.to_owned());
        let (tables, device) = (tables.clone(), device.clone());
        std::sync::Arc::new(move |stamp| {
            notify::hint_payload(&instance, &user, &app_id, &tables, device.as_deref(), stamp)
        })
    };
    let response = shared
        .store
        .push(
            user,
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
            .notify(user, app_id, Some(tables), device.as_deref());
    }
    Ok(json_response(StatusCode::OK, &response))
}

pub(super) async fn pull(
    shared: &Shared,
    request: Request<Incoming>,
    app_id: &str,
) -> Result<Response<Body>, ApiError> {
    let caller = Caller::authorize(shared, request.headers()).await?;
    let query = protocol::parse_pull_query(
        request.uri().query(),
        shared.config.pull_page_size,
        shared.config.pull_max_page_size,
    )?;
    let response = shared
        .store
        .pull(&caller.claims.sub, app_id, caller.device.as_deref(), &query)
        .await?;
    shared
        .metrics
        .changes_pulled
        .fetch_add(response.server_changes.len() as u64, Ordering::Relaxed);
    Ok(json_response(StatusCode::OK, &response))
}

pub(super) async fn stream(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    scope: sse::Scope,
) -> Result<Response<Body>, ApiError> {
    // The slot is held until the stream's response is built (its body outlives it).
    let Caller {
        claims,
        slot: _slot,
        device,
    } = Caller::authorize(shared, request.headers()).await?;
    let expires = ws::token_deadline(&claims, shared.config.ws_token_leeway);
    let response = sse::open(shared.clone(), request, scope, claims.sub, device, expires).await?;
    Ok(response.map(BodyExt::boxed))
}

/// A WebSocket upgrade: authenticated in-band, after the 101.
pub(super) fn socket(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    interest: Interest,
) -> Result<Response<Body>, ApiError> {
    let response = ws::upgrade(shared.clone(), request, interest)?;
    Ok(response.map(BodyExt::boxed))
}

pub(super) async fn health(shared: &Shared) -> Result<Response<Body>, ApiError> {
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

/// `/metrics`: this instance's counters in the Prometheus text format.
pub(super) fn metrics(shared: &Shared) -> Result<Response<Body>, ApiError> {
    let text = crate::metrics::render(&shared.metrics, &shared.metrics_snapshot());
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
