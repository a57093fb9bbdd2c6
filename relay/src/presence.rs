//! `GET /presence?hostIds=a,b`: which hosts are online, and when each was last seen, for
//! a caller who may reach them (superset's API asks for the dots it draws).
//!
//! 1 to [`MAX_PRESENCE_HOSTS`] hostIds. The token is checked once per host, as a client
//! of that host would be (policy, then the access check, cached); hosts the caller may
//! not reach, and ids that are not hostIds, are left out rather than failing the batch.
//! A token that is bad for all of them (missing, expired, invalid) is 401. Online means
//! a tunnel is registered here or in the directory; `lastSeenAt` (ms since the epoch)
//! is the last registration or heartbeat the directory saw, kept for
//! [`crate::limits::SEEN_TTL`].

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};
use tokio::time::timeout;

use crate::auth::{AuthError, Role, bearer_token};
use crate::host_id::HostId;
use crate::limits::DIRECTORY_TIMEOUT;
use crate::limits::v2::MAX_PRESENCE_HOSTS;
use crate::state::Relay;
use crate::telemetry;

/// `GET /presence?hostIds=a,b`.
pub(crate) async fn presence(
    State(relay): State<Relay>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.as_deref();
    let ids: Vec<String> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "hostIds")
        .map(|(_, value)| {
            value
                .split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() || ids.len() > MAX_PRESENCE_HOSTS {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("Provide 1-{MAX_PRESENCE_HOSTS} hostIds"),
        );
    }
    let Some(token) = bearer_token(&headers, query) else {
        return error(StatusCode::UNAUTHORIZED, &AuthError::Missing.to_string());
    };
    let hosts: Vec<HostId> = ids.iter().filter_map(|id| HostId::parse(id).ok()).collect();
    let verdicts = join_all(
        hosts
            .iter()
            .map(|host| relay.verifier().authorize(&token, Role::Client, host)),
    )
    .await;
    let mut allowed = Vec::with_capacity(hosts.len());
    for (host, verdict) in hosts.into_iter().zip(verdicts) {
        match verdict {
            Ok(_) => allowed.push(host),
            // About the token, not the host: the same for every host asked.
            Err(err @ (AuthError::Missing | AuthError::Expired | AuthError::Invalid(_))) => {
                telemetry::auth_failed("presence", err.kind());
                return error(StatusCode::UNAUTHORIZED, &err.to_string());
            }
            Err(err @ AuthError::KeysUnavailable) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, &err.to_string());
            }
            Err(_) => {}
        }
    }
    let directory = relay.directory();
    let owners = match timeout(DIRECTORY_TIMEOUT, directory.lookup_many(&allowed)).await {
        Ok(Ok(owners)) => owners,
        _ => vec![None; allowed.len()],
    };
    let seen = match timeout(DIRECTORY_TIMEOUT, directory.last_seen_many(&allowed)).await {
        Ok(Ok(seen)) => seen,
        _ => vec![None; allowed.len()],
    };
    let mut out = Map::new();
    for ((host, owner), seen) in allowed.iter().zip(owners).zip(seen) {
        let local = relay.registry().get(host);
        let last_seen = seen.or_else(|| {
            let tunnel = local.as_ref()?;
            let at = tunnel.last_pong().unwrap_or_else(|| tunnel.connected_at());
            at.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis() as u64)
        });
        out.insert(
            host.as_str().to_owned(),
            json!({
                "online": local.is_some() || owner.is_some(),
                "lastSeenAt": last_seen,
            }),
        );
    }
    axum::Json(json!({ "hosts": Value::Object(out) })).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}
