//! `GET /admin/tunnels`: what this machine holds, for operators.
//!
//! Off unless `RELAY_ADMIN_TOKEN` is set; then it needs `Authorization: Bearer <token>`
//! (401 otherwise). The token is compared in constant time and never logged.
//!
//! `?all=1` adds one page of the whole directory (every machine's hosts):
//! `&count=` entries at most about (default [`ADMIN_DIRECTORY_PAGE`], at most
//! [`ADMIN_DIRECTORY_PAGE_MAX`]), from `&cursor=` (the `nextCursor` of the previous page;
//! `null` there means the walk is done).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::timeout;

use crate::limits::{ADMIN_DIRECTORY_PAGE, ADMIN_DIRECTORY_PAGE_MAX, DIRECTORY_TIMEOUT};
use crate::state::Relay;

/// The query of `GET /admin/tunnels`.
#[derive(Debug, Deserialize)]
pub(crate) struct TunnelsQuery {
    /// `1` (or `true`) adds a page of the whole directory.
    #[serde(default)]
    all: Option<String>,
    /// Where the page starts (the previous page's `nextCursor`).
    #[serde(default)]
    cursor: Option<String>,
    /// How many entries, about.
    #[serde(default)]
    count: Option<String>,
}

/// `GET /admin/tunnels`.
pub(crate) async fn tunnels(
    State(relay): State<Relay>,
    headers: HeaderMap,
    query: Result<Query<TunnelsQuery>, QueryRejection>,
) -> Response {
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
                "protocol": t.protocol().as_str(),
                "pendingExchanges": t.pending_exchanges(),
                "openChannels": t.open_channels(),
                "lastPong": t.last_pong().map(unix_seconds),
                "directorySynced": t.is_synced(),
            })
        })
        .collect();
    tunnels.sort_by(|a, b| a["hostId"].as_str().cmp(&b["hostId"].as_str()));
    let mut body = json!({
        "region": owner.region,
        "machine": owner.machine_id,
        "draining": relay.is_draining(),
        "count": tunnels.len(),
        "tunnels": tunnels,
    });
    // Read only now: the token is checked before anything about the request is answered.
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": rejection.body_text()})),
            )
                .into_response();
        }
    };
    if matches!(query.all.as_deref(), Some("1" | "true")) {
        match directory_page(&relay, &query).await {
            Ok(page) => body["directory"] = page,
            Err(response) => return response,
        }
    }
    Json(body).into_response()
}

/// One page of the whole directory, as JSON; a 400 for a bad cursor or count. A directory
/// that fails is reported in the page (`error`), not as a failed request: the local part
/// of the answer still helps.
async fn directory_page(relay: &Relay, query: &TunnelsQuery) -> Result<Value, Response> {
    let bad = |what: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{what} must be a whole number")})),
        )
            .into_response()
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => c.parse::<u64>().map_err(|_| bad("cursor"))?,
    };
    let count = match query.count.as_deref() {
        None | Some("") => ADMIN_DIRECTORY_PAGE,
        Some(c) => c.parse::<usize>().map_err(|_| bad("count"))?,
    }
    .clamp(1, ADMIN_DIRECTORY_PAGE_MAX);
    Ok(
        match timeout(DIRECTORY_TIMEOUT, relay.directory().list(cursor, count)).await {
            Ok(Ok(page)) => {
                let entries: Vec<Value> = page
                    .entries
                    .iter()
                    .map(|(host, owner)| {
                        json!({
                            "hostId": host.as_str(),
                            "owner": owner.to_string(),
                            "region": owner.region,
                            "machine": owner.machine_id,
                        })
                    })
                    .collect();
                json!({
                    "kind": relay.directory().kind(),
                    "entries": entries,
                    // A string: cursors can exceed what JSON numbers carry exactly.
                    "nextCursor": (page.next != 0).then(|| page.next.to_string()),
                })
            }
            Ok(Err(err)) => json!({"error": err.to_string()}),
            Err(_) => json!({"error": "the directory did not answer in time"}),
        },
    )
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
