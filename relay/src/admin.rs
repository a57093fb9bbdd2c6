//! `GET /admin/tunnels`: what this machine holds, for operators.
//!
//! Off unless `RELAY_ADMIN_TOKEN` is set; then it needs `Authorization: Bearer <token>`
//! (401 otherwise). The token is compared in constant time and never logged.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use crate::server::Relay;

/// `GET /admin/tunnels`.
pub(crate) async fn tunnels(State(relay): State<Relay>, headers: HeaderMap) -> Response {
    let Some(expected) = &relay.config().admin_token else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "admin endpoint disabled (set RELAY_ADMIN_TOKEN)"})),
        )
            .into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !presented.is_some_and(|t| constant_time_eq(t.as_bytes(), expected.expose())) {
        let mut response = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong admin token"})),
        )
            .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }

    let owner = &relay.config().owner;
    let mut tunnels: Vec<Value> = relay
        .registry()
        .handles()
        .iter()
        .map(|t| {
            json!({
                "hostId": t.host().as_str(),
                "tunnel": t.id().to_string(),
                "connectedSince": unix_seconds(t.connected_at()),
                "protocol": "v1",
                "pendingExchanges": t.pending_exchanges(),
                "openChannels": t.open_channels(),
                "lastPong": t.last_pong().map(unix_seconds),
                "directorySynced": t.is_synced(),
            })
        })
        .collect();
    tunnels.sort_by(|a, b| a["hostId"].as_str().cmp(&b["hostId"].as_str()));
    Json(json!({
        "region": owner.region,
        "machine": owner.machine_id,
        "draining": relay.is_draining(),
        "count": tunnels.len(),
        "tunnels": tunnels,
    }))
    .into_response()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Compares without an early exit, so the time taken does not tell how much of a guess
/// was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_tokens_match_and_others_do_not() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokeN"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }
}
