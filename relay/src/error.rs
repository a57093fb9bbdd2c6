//! Errors answered to clients, each saying whose fault it is.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::auth::AuthError;
use crate::host_id::InvalidHostId;
use crate::tunnel::ExchangeError;

/// Why a client request could not be carried. The status code follows from whose fault
/// it is: 4xx the client's, 502/504 the host's, 503 "nobody here to serve it".
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Client: the hostId in the path is not valid.
    #[error("{0}")]
    InvalidHostId(#[from] InvalidHostId),
    /// Client: no or bad credentials.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// Client: a plain request where a WebSocket upgrade is required.
    #[error("this endpoint needs a WebSocket upgrade")]
    NotWebSocket,
    /// Client: the path cannot be carried to the host.
    #[error("invalid request path")]
    BadPath,
    /// Nobody holds a tunnel for this host.
    #[error("host not connected")]
    HostNotConnected,
    /// The relay that holds the host's tunnel failed mid-request.
    #[error("the relay holding this host failed to answer")]
    PeerFailed,
    /// Client: its address holds its limit of open WebSocket channels
    /// ([`crate::limits::MAX_CHANNELS_PER_CLIENT`]): 429.
    #[error("too many open WebSocket channels from this client")]
    TooManyClientChannels,
    /// The exchange with the host failed (overloaded, timeout, tunnel closed, bad answer,
    /// or a request body the tunnel cannot carry).
    #[error("{0}")]
    Exchange(#[from] ExchangeError),
}

impl ClientError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ClientError::InvalidHostId(_) | ClientError::BadPath => StatusCode::BAD_REQUEST,
            ClientError::Auth(err) => err.status(),
            ClientError::NotWebSocket => StatusCode::UPGRADE_REQUIRED,
            ClientError::HostNotConnected => StatusCode::SERVICE_UNAVAILABLE,
            ClientError::PeerFailed => StatusCode::BAD_GATEWAY,
            ClientError::TooManyClientChannels => StatusCode::TOO_MANY_REQUESTS,
            ClientError::Exchange(err) => match err {
                ExchangeError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
                ExchangeError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                ExchangeError::TunnelClosed | ExchangeError::InvalidResponse(_) => {
                    StatusCode::BAD_GATEWAY
                }
                ExchangeError::BodyTooLarge { .. } | ExchangeError::BodyTooLargeEncoded { .. } => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                ExchangeError::BodyNotText => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ExchangeError::BodyUnreadable => StatusCode::BAD_REQUEST,
                ExchangeError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
                ExchangeError::OverBudget(_) | ExchangeError::TooManyChannels => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
        }
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if let ClientError::Auth(AuthError::Missing | AuthError::Expired | AuthError::Invalid(_)) =
            self
        {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl ClientError {
    /// The answer for a request under the host's `/trpc/` (superset's API): the error in
    /// tRPC's shape, which its clients parse (`{"error":{"json":{"message","code",
    /// "data":{"code","httpStatus"}}}}`, superjson-serialized), with the same status and
    /// headers as [`IntoResponse`] gives.
    pub fn into_trpc_response(self) -> Response {
        let message = self.to_string();
        let mut response = self.into_response();
        let status = response.status();
        let (key, code) = trpc_code(status);
        *response.body_mut() = axum::body::Body::from(
            json!({
                "error": {
                    "json": {
                        "message": message,
                        "code": code,
                        "data": { "code": key, "httpStatus": status.as_u16() },
                    }
                }
            })
            .to_string(),
        );
        response
    }
}

/// Whether a host-local path is one of superset's tRPC calls, whose errors its clients
/// read in tRPC's shape.
pub fn is_trpc_path(path: &str) -> bool {
    path == "/trpc" || path.starts_with("/trpc/")
}

/// tRPC's error key and JSON-RPC code for an HTTP status (`TRPC_ERROR_CODES_BY_KEY`).
fn trpc_code(status: StatusCode) -> (&'static str, i32) {
    match status.as_u16() {
        400 => ("BAD_REQUEST", -32600),
        401 => ("UNAUTHORIZED", -32001),
        403 => ("FORBIDDEN", -32003),
        404 => ("NOT_FOUND", -32004),
        408 => ("TIMEOUT", -32008),
        413 => ("PAYLOAD_TOO_LARGE", -32013),
        415 => ("UNSUPPORTED_MEDIA_TYPE", -32015),
        426 => ("BAD_REQUEST", -32600),
        429 => ("TOO_MANY_REQUESTS", -32029),
        502 => ("BAD_GATEWAY", -32603),
        503 => ("SERVICE_UNAVAILABLE", -32603),
        504 => ("GATEWAY_TIMEOUT", -32603),
        _ => ("INTERNAL_SERVER_ERROR", -32603),
    }
}
