//! The relay's HTTP routes: health, readiness, metrics, admin, the host side (`/tunnel`)
//! and the client side (`/hosts/{hostId}/...`). Separate from serving ([`crate::server`])
//! so tests can drive it directly.

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use serde_json::json;
use tracing::{Instrument, debug, debug_span};

use crate::client;
use crate::host;
use crate::state::Relay;
use crate::telemetry::{self, redact_uri};

/// The relay's HTTP routes. Separate from serving so tests can drive it directly.
pub fn app(relay: Relay) -> Router {
    let router = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/tunnels", get(crate::admin::tunnels))
        .route("/tunnel", get(host::accept))
        .route("/v2/control", get(host::accept_v2))
        .route("/v2/dial", get(crate::dial::accept))
        .route("/presence", get(crate::presence::presence))
        .route("/relay/holds/{host}", get(crate::routing::holds))
        // `/hosts/{hostId}` and everything under it: see `hosts_or_not_found`.
        .fallback(hosts_or_not_found);
    // The per-request debug span costs a boxed future and a layer on every request; the
    // log filter is fixed at startup, so it is only added when debug lines can show.
    let router = if tracing::enabled!(tracing::Level::DEBUG) {
        router.layer(middleware::from_fn(trace_request))
    } else {
        router
    };
    let base_domain = relay.config().base_domain.clone();
    let router = router.with_state(relay);
    match base_domain {
        // Before routing, which the rewrite feeds: the outer router sends everything to
        // the routes above, rewritten when it names a host's subdomain.
        Some(base) => Router::new()
            .fallback_service(router)
            .layer(middleware::from_fn_with_state(
                base,
                crate::subdomain::route,
            )),
        None => router,
    }
}

async fn health(State(relay): State<Relay>) -> impl IntoResponse {
    axum::Json(json!({
        "ok": true,
        "region": relay.config().owner.region,
        "machine": relay.config().owner.machine_id,
        // Superset's host client speaks its v2 (dial-back) protocol to a relay that says
        // this; anything else gets its v1 client.
        "proto": crate::protocol::v2::HEALTH_PROTO,
    }))
}

async fn ready(State(relay): State<Relay>) -> Response {
    if relay.is_draining() || relay.shutdown_token().is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ok": false, "state": "draining"})),
        )
            .into_response();
    }
    axum::Json(json!({"ok": true})).into_response()
}

async fn metrics() -> impl IntoResponse {
    crate::allocator::record();
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::metrics_handle().render(),
    )
}

/// The client side, `ANY /hosts/{hostId}` and `ANY /hosts/{hostId}/{*path}`, or else 404.
/// Served from the fallback, not as routes: a route with parameters makes axum match
/// and store them (a map entry and strings per request, 3 % of the relay's instructions
/// per proxied request) for a handler that reads the path itself.
async fn hosts_or_not_found(
    state: State<Relay>,
    peer: crate::listener::PeerAddr,
    request: Request,
) -> Response {
    if client::is_host_path(request.uri().path()) {
        client::host_request(state, peer, request).await
    } else {
        not_found().await.into_response()
    }
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": "not found"})),
    )
}

/// A debug span and line per request, with the URI redacted. Off the hot path unless
/// debug logging is on.
async fn trace_request(request: Request, next: Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(request).await;
    }
    let span = debug_span!(
        "request",
        method = %request.method(),
        uri = %redact_uri(&request.uri().to_string()),
    );
    async move {
        let started = tokio::time::Instant::now();
        let response = next.run(request).await;
        debug!(status = response.status().as_u16(), elapsed = ?started.elapsed(), "request finished");
        response
    }
    .instrument(span)
    .await
}
