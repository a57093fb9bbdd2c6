//! The relay's HTTP service: health, readiness, metrics, admin, the host side
//! (`/tunnel`) and the client side (`/hosts/{hostId}/...`). Separate from serving
//! connections ([`crate::connections`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use serde_json::json;
use tower::ServiceExt;
use tracing::{Instrument, debug, debug_span};

use crate::client;
use crate::connections::Accepted;
use crate::host;
use crate::state::Relay;
use crate::telemetry::{self, redact_uri};

/// The relay's HTTP service: a host's subdomain is rewritten to its path first
/// ([`crate::subdomain`]); then the client side (`/hosts/{hostId}/...`, nearly every
/// request a relay serves) is served directly, and everything else by axum's router.
///
/// The client side is not a route: axum's router, even reaching it as its fallback,
/// matched and stored path parameters in every request's extensions, cloned itself and
/// wrapped the handler's future several times, for a handler that reads the path itself
/// (about 5 % of the relay's instructions per proxied request).
#[derive(Clone)]
pub struct App {
    relay: Relay,
    router: Router,
    base_domain: Option<Arc<str>>,
    /// Debug logging is on (fixed at startup): a span and a line per request.
    trace: bool,
}

/// The relay's HTTP service for `relay`.
pub fn app(relay: Relay) -> App {
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
        .fallback(not_found)
        .with_state(relay.clone());
    App {
        base_domain: relay.config().base_domain.clone(),
        relay,
        router,
        trace: tracing::enabled!(tracing::Level::DEBUG),
    }
}

impl App {
    /// Serves one request.
    pub async fn serve(self, mut request: Request) -> Response {
        if let Some(base) = &self.base_domain
            && let Err(refused) = crate::subdomain::rewrite(&mut request, base)
        {
            return refused.into_response();
        }
        if !self.trace {
            return self.dispatch(request).await;
        }
        // A debug span and line per request, with the URI redacted.
        let span = debug_span!(
            "request",
            method = %request.method(),
            uri = %redact_uri(&request.uri().to_string()),
        );
        async move {
            let started = tokio::time::Instant::now();
            let response = self.dispatch(request).await;
            debug!(status = response.status().as_u16(), elapsed = ?started.elapsed(), "request finished");
            response
        }
        .instrument(span)
        .await
    }

    async fn dispatch(self, request: Request) -> Response {
        if client::is_host_path(request.uri().path()) {
            match Accepted::of(request.extensions()).map(Accepted::peer) {
                Some(peer) => client::host_request(self.relay, peer, request).await,
                // Only `connections::serve` calls this, and it always says.
                None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        } else {
            match self.router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
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

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": "not found"})),
    )
}
