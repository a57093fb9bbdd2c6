//! The client side: `/hosts/{hostId}/...` requests carried over the host's tunnel.
//!
//! A plain request becomes one v1 HTTP exchange; a WebSocket upgrade becomes a channel.
//! Either way the client is authorized first (role `client`, host listed in the token)
//! on the machine that serves the request.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt as _;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use crate::auth::{Role, bearer_token};
use crate::error::ClientError;
use crate::headers;
use crate::host_id::HostId;
use crate::listener::PeerAddr;
use crate::protocol::{Frame, Headers, close_code};
use crate::routing::{self, Forward, Hop, Route};
use crate::state::Relay;
use crate::telemetry;
use crate::tunnel::{
    Channel, ExchangeError, ExchangeFailure, HttpRequest, HttpResponse, TunnelHandle,
};

/// `ANY /hosts/{hostId}/{*path}`.
pub(crate) async fn host_request(
    State(relay): State<Relay>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let mut route = "none";
    let response = match serve(relay, peer, request, &mut route).await {
        Ok(response) => response,
        Err(err) => {
            debug!(%err, status = err.status().as_u16(), "client request refused");
            err.into_response()
        }
    };
    telemetry::client_request(
        response.status().as_u16(),
        route,
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Serves one client request; `route` is set to how it was served, for the metrics.
async fn serve(
    relay: Relay,
    peer: SocketAddr,
    request: Request,
    route: &mut &'static str,
) -> Result<Response, ClientError> {
    let uri = request.uri().clone();
    let (raw_host, rest) = split_host_path(uri.path()).ok_or(ClientError::HostNotConnected)?;
    let host = HostId::parse(raw_host)?;
    let query = uri.query();
    let token = bearer_token(request.headers(), query).ok_or(crate::auth::AuthError::Missing)?;
    relay
        .verifier()
        .authorize(&token, Role::Client, &host)
        .inspect_err(|e| telemetry::auth_failed("client", e.kind()))?;

    let hop = Hop::of(request.headers());
    let route_found = match routing::route(&relay, &host, hop.is_hopped()).await {
        Err(ClientError::HostNotConnected) if hop.is_hopped() => return Ok(hop.host_not_here()),
        other => other?,
    };
    let tunnel = match route_found {
        Route::Local(tunnel) => tunnel,
        Route::Remote(owner) => {
            let (mut parts, body) = request.into_parts();
            let what = if routing::is_whoowns(&parts.method, rest) {
                Forward::WhoOwns
            } else if is_websocket_upgrade(&parts.headers) {
                let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &relay)
                    .await
                    .map_err(|_| ClientError::NotWebSocket)?;
                Forward::WebSocket(upgrade)
            } else {
                Forward::Http(
                    read_body(&parts.headers, body, relay.config().limits.max_body_bytes).await?,
                )
            };
            *route = match (&what, relay.config().routing) {
                (Forward::WebSocket(_), _) => "bridge",
                (_, crate::config::RoutingMode::FlyReplay) => "replay",
                _ => "proxy",
            };
            return routing::forward(&relay, &host, owner, client_ip(peer), &parts, what).await;
        }
    };
    *route = "local";
    if routing::is_whoowns(request.method(), rest) {
        return Ok(axum::Json(json!({
            "ok": true,
            "region": relay.config().owner.region,
            "machine": relay.config().owner.machine_id,
        }))
        .into_response());
    }

    let path = if rest.is_empty() { "/" } else { rest }.to_owned();
    let query = strip_token(query);
    if is_websocket_upgrade(request.headers()) {
        let (mut parts, _body) = request.into_parts();
        let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &relay)
            .await
            .map_err(|_| ClientError::NotWebSocket)?;
        return Ok(open_channel(relay, tunnel, upgrade, path, query));
    }
    exchange(relay, tunnel, peer, request, path, query, hop).await
}

/// Reads a request body whole, refusing it (413) past `limit` before reading further.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, ClientError> {
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit as u64
    {
        return Err(ClientError::BodyTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        if std::error::Error::source(&err)
            .is_some_and(|e| e.is::<http_body_util::LengthLimitError>())
        {
            ClientError::BodyTooLarge { limit }
        } else {
            ClientError::BodyUnreadable
        }
    })
}

/// The client's address, with IPv4-mapped IPv6 (from the dual-stack socket) unmapped.
fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// One HTTP exchange over the tunnel.
async fn exchange(
    relay: Relay,
    tunnel: TunnelHandle,
    peer: SocketAddr,
    request: Request,
    path: String,
    query: Option<String>,
    hop: Hop,
) -> Result<Response, ClientError> {
    let limits = &relay.config().limits;
    // Refuse before reading a byte of body if the tunnel is full.
    let permit = tunnel.reserve()?;
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body, limits.max_body_bytes).await?;
    let body = String::from_utf8(body.into()).map_err(|_| ClientError::BodyNotText)?;
    telemetry::bytes("to_host", body.len());
    let path = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let request = HttpRequest {
        method: parts.method.as_str().to_owned(),
        path,
        headers: Headers::from_map(&headers::to_host(&parts.headers, client_ip(peer))),
        body,
    };
    let response = match tunnel
        .try_exchange_reserved(permit, request, limits.exchange_timeout)
        .await
    {
        Ok(response) => response,
        Err(ExchangeFailure::Failed(err)) => return Err(err.into()),
        Err(ExchangeFailure::NotDelivered(request)) => {
            return redeliver(&relay, tunnel.host(), peer, &parts, request, hop).await;
        }
    };
    telemetry::bytes("from_host", response.body.len());
    into_client_response(response)
}

/// Routes again, once, a request whose tunnel ended before writing it (replaced by a
/// newer tunnel, closed by a drain, gone): the host never saw it, so any method may go to
/// wherever the host is now.
async fn redeliver(
    relay: &Relay,
    host: &HostId,
    peer: SocketAddr,
    parts: &http::request::Parts,
    request: HttpRequest,
    hop: Hop,
) -> Result<Response, ClientError> {
    telemetry::redelivered();
    match routing::route(relay, host, hop.is_hopped()).await {
        Ok(Route::Local(tunnel)) => {
            let permit = tunnel.reserve()?;
            let response = tunnel
                .exchange_reserved(permit, request, relay.config().limits.exchange_timeout)
                .await?;
            telemetry::bytes("from_host", response.body.len());
            into_client_response(response)
        }
        Ok(Route::Remote(owner)) => {
            let body = Forward::Http(bytes::Bytes::from(request.body));
            routing::forward(relay, host, owner, client_ip(peer), parts, body).await
        }
        Err(ClientError::HostNotConnected) if hop.is_hopped() => Ok(hop.host_not_here()),
        Err(err) => Err(err),
    }
}

/// A WebSocket channel over the tunnel.
fn open_channel(
    relay: Relay,
    tunnel: TunnelHandle,
    upgrade: WebSocketUpgrade,
    path: String,
    query: Option<String>,
) -> Response {
    let queue = relay.config().limits.channel_queue;
    let tracker = relay.tracker().clone();
    let span = debug_span!("channel", host = %tunnel.host(), %path);
    crate::websocket::configure(upgrade, &relay.config().limits)
        .on_upgrade(move |socket| {
            tracker.track_future(
                async move {
                    match tunnel.open_channel(path, query, queue).await {
                        Ok(channel) => {
                            telemetry::channel_open(1.0);
                            run_channel(socket, channel).await;
                            telemetry::channel_open(-1.0);
                        }
                        Err(_) => close_client(socket, Some(close_code::GOING_AWAY)).await,
                    }
                }
                .instrument(span),
            )
        })
        .into_response()
}

/// Carries frames between the client socket and the channel until either side closes.
async fn run_channel(mut socket: WebSocket, mut channel: Channel) {
    loop {
        tokio::select! {
            // Host frames first: everything the host sent before its close is delivered
            // before the close.
            biased;
            frame = channel.frames.recv() => match frame {
                Some(frame) => {
                    if socket.send(to_message(frame)).await.is_err() {
                        channel.close(None).await;
                        return;
                    }
                }
                // The channel is gone: closed by the host, overflowed, or the tunnel went.
                None => {
                    let code = channel.closed.try_recv().unwrap_or(Some(close_code::GOING_AWAY));
                    close_client(socket, code).await;
                    return;
                }
            },
            code = &mut channel.closed => {
                while let Ok(frame) = channel.frames.try_recv() {
                    if socket.send(to_message(frame)).await.is_err() {
                        return;
                    }
                }
                close_client(socket, code.unwrap_or(Some(close_code::GOING_AWAY))).await;
                return;
            }
            message = socket.recv() => {
                let frame = match message {
                    Some(Ok(Message::Text(text))) => Frame::Text(text.to_string()),
                    Some(Ok(Message::Binary(bytes))) => Frame::Binary(bytes.to_vec()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        channel.close(frame.map(|f| f.code)).await;
                        // The socket answers the client's Close as it is dropped.
                        let _ = socket.close().await;
                        return;
                    }
                    Some(Err(err)) => {
                        let too_big = err
                            .into_inner()
                            .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                            .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
                        let code = if too_big { close_code::TOO_BIG } else { close_code::GOING_AWAY };
                        channel.close(Some(code)).await;
                        if too_big {
                            close_client(socket, Some(code)).await;
                        }
                        return;
                    }
                    None => {
                        channel.close(None).await;
                        return;
                    }
                };
                telemetry::bytes("to_host", frame_len(&frame));
                if channel.send(frame).await.is_err() {
                    close_client(socket, Some(close_code::GOING_AWAY)).await;
                    return;
                }
            }
        }
    }
}

fn to_message(frame: Frame) -> Message {
    telemetry::bytes("from_host", frame_len(&frame));
    match frame {
        Frame::Text(text) => Message::Text(text.into()),
        Frame::Binary(bytes) => Message::Binary(bytes.into()),
    }
}

fn frame_len(frame: &Frame) -> usize {
    match frame {
        Frame::Text(text) => text.len(),
        Frame::Binary(bytes) => bytes.len(),
    }
}

/// Closes a client socket with `code` (no code when absent or not sendable on the wire).
async fn close_client(mut socket: WebSocket, code: Option<u16>) {
    let frame = code
        .filter(|c| close_code::is_sendable(*c))
        .map(|code| CloseFrame {
            code,
            reason: "".into(),
        });
    let _ = tokio::time::timeout(
        crate::limits::CLOSE_TIMEOUT,
        socket.send(Message::Close(frame)),
    )
    .await;
}

/// Splits `/hosts/<id>/<rest>` into the raw id segment and `/<rest>` (empty when none).
fn split_host_path(path: &str) -> Option<(&str, &str)> {
    let after = path.strip_prefix("/hosts/")?;
    Some(match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    })
}

/// The query string without any `token` parameter (which is for the relay, never the
/// host). Other parameters keep their exact encoding and order.
fn strip_token(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && key != "token"
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The client's response from the host's answer.
fn into_client_response(response: HttpResponse) -> Result<Response, ClientError> {
    let status = StatusCode::from_u16(response.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            ExchangeError::InvalidResponse(format!(
                "status {} is not a final HTTP status",
                response.status
            ))
        })?;
    let mut out = Response::new(Body::from(response.body));
    *out.status_mut() = status;
    let headers = out.headers_mut();
    for (name, value) in response.headers.0 {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            telemetry::message_ignored("bad_header");
            continue;
        };
        if name == header::CONTENT_LENGTH {
            continue;
        }
        headers.append(name, value);
    }
    headers::from_host(headers);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_path_splits_after_the_id() {
        assert_eq!(split_host_path("/hosts/h1/a/b"), Some(("h1", "/a/b")));
        assert_eq!(split_host_path("/hosts/h1/"), Some(("h1", "/")));
        assert_eq!(split_host_path("/hosts/h1"), Some(("h1", "")));
        assert_eq!(split_host_path("/other"), None);
    }

    #[test]
    fn token_is_stripped_and_the_rest_kept_verbatim() {
        assert_eq!(
            strip_token(Some("a=1&token=x&b=%20")),
            Some("a=1&b=%20".into())
        );
        assert_eq!(strip_token(Some("token=x")), None);
        assert_eq!(
            strip_token(Some("tokens=1&flag")),
            Some("tokens=1&flag".into())
        );
        assert_eq!(strip_token(None), None);
    }

    #[test]
    fn host_response_with_informational_status_is_refused() {
        let response = HttpResponse {
            status: 101,
            headers: Headers::default(),
            body: Vec::new(),
        };
        assert!(into_client_response(response).is_err());
    }
}
