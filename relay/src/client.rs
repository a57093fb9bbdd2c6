//! The client side: `/hosts/{hostId}/...` requests carried over the host's tunnel.
//!
//! A plain request becomes one exchange on the tunnel; a WebSocket (an HTTP/1.1 upgrade,
//! or an extended CONNECT over HTTP/2) becomes a channel. Either way the client is
//! authorized first (role `client`, host listed in the token) on the machine that
//! serves the request. Nothing here knows which protocol the tunnel speaks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header;
use http::{Method, Uri};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, debug_span};

use crate::access_log;
use crate::auth::{Role, bearer_token};
use crate::body::Paced;
use crate::client_socket::{ClientSocket, ClientUpgrade, Received, SendFailed};
use crate::clients::{IpSlot, peer_ip};
use crate::connections::Accepted;
use crate::error::ClientError;
use crate::headers::{self, Prefix};
use crate::host_id::HostId;
use crate::protocol::close_code;
use crate::query::strip_token;
use crate::routing::{self, Forward, Hop, Route};
use crate::state::Relay;
use crate::subdomain::{self, Subdomain};
use crate::telemetry;
use crate::tunnel::{Channel, ChannelEvent, ChannelRequest, ExchangeFailure, Opened, TunnelHandle};

/// `ANY /hosts/{hostId}/{*path}`, from `peer` ([`crate::router::App`] calls it).
pub(crate) async fn host_request(relay: Relay, peer: SocketAddr, request: Request) -> Response {
    let started = Instant::now();
    let mut route = "none";
    let trpc = split_host_path(request.uri().path())
        .is_some_and(|(_, rest)| crate::error::is_trpc_path(rest));
    // The access log's view of the request, taken before it is consumed.
    let access = relay.config().access_log.map(|format| {
        let entry = access_log::Entry {
            kind: "http",
            host: split_host_path(request.uri().path())
                .map(|(host, _)| host.to_owned())
                .unwrap_or_default(),
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            route: "none",
        };
        (format, entry, Arc::new(AtomicU64::new(0)))
    });
    let request = match &access {
        Some((_, _, bytes_in)) => {
            let bytes_in = bytes_in.clone();
            request.map(|body| Body::new(access_log::Counted::new(body, bytes_in)))
        }
        None => request,
    };
    let mut cookie = None;
    let response = match serve(relay, peer, request, &mut route, &mut cookie).await {
        Ok(mut response) => {
            if let Some(cookie) = cookie {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            response
        }
        Err(err) => {
            debug!(%err, status = err.status().as_u16(), "client request refused");
            if trpc {
                err.into_trpc_response()
            } else {
                err.into_response()
            }
        }
    };
    telemetry::client_request(
        response.status().as_u16(),
        route,
        started.elapsed().as_secs_f64(),
    );
    match access {
        // A channel is logged when it closes (by the machine that runs it).
        Some((format, mut entry, bytes_in))
            if response.status() != http::StatusCode::SWITCHING_PROTOCOLS
                && entry.method != "CONNECT" =>
        {
            entry.status = response.status().as_u16();
            entry.route = route;
            response.map(|body| {
                Body::new(access_log::Logged::new(
                    body, entry, format, bytes_in, started,
                ))
            })
        }
        _ => response,
    }
}

/// Serves one client request; `route` is set to how it was served, for the metrics, and
/// `cookie` to a `Set-Cookie` the response must carry.
async fn serve(
    relay: Relay,
    peer: SocketAddr,
    mut request: Request,
    route: &mut &'static str,
    cookie: &mut Option<http::HeaderValue>,
) -> Result<Response, ClientError> {
    let uri = request.uri().clone();
    // An HTTP/2 client names the authority in its URI, not in `Host`: the host is told it
    // all the same (`X-Forwarded-Host`).
    if !request.headers().contains_key(header::HOST)
        && let Some(Ok(authority)) = uri
            .authority()
            .map(|a| http::HeaderValue::from_str(a.as_str()))
    {
        request.headers_mut().insert(header::HOST, authority);
    }
    let (raw_host, rest) = split_host_path(uri.path()).ok_or(ClientError::HostNotConnected)?;
    let host = HostId::from_path_segment(raw_host)?;
    let query = uri.query();
    let on_subdomain = request.extensions().get::<Subdomain>().is_some();
    // The bearer header, `?token=`, then the cookie a `?token=` visit to a subdomain left
    // (also on a request a peer relay forwards from one).
    let token = bearer_token(request.headers(), query)
        .or_else(|| subdomain::cookie_token(request.headers()))
        .ok_or(crate::auth::AuthError::Missing)?;
    relay
        .verifier()
        .authorize(&token, Role::Client, &host)
        .await
        .inspect_err(|e| telemetry::auth_failed("client", e.kind()))?;
    if on_subdomain
        && !request.headers().contains_key(header::AUTHORIZATION)
        && query.is_some_and(|q| strip_token(Some(q)).as_deref() != Some(q))
    {
        // A browser's `?token=` visit: keep the token for the requests that follow.
        *cookie = subdomain::set_cookie(&token);
    }

    let key = if request.headers().contains_key(crate::headers::HOP_NAME) {
        relay.hop_key().await
    } else {
        None
    };
    let hop = Hop::of(request.headers(), key.as_deref());
    if hop == Hop::Peer
        && let Some(accepted) = Accepted::of(request.extensions())
    {
        // A peer relay's connection is not a client's: it leaves the per-address count
        // (each channel bridged in proxy routing is one).
        accepted.place().give_back();
    }
    let route_found = match routing::route(&relay, &host, hop.is_hopped()).await {
        Err(ClientError::HostNotConnected) if hop.is_hopped() => return Ok(hop.host_not_here()),
        other => other?,
    };
    let forwarded = headers::Forwarded {
        trusted: hop == Hop::Peer || relay.config().client_ip_header.is_some(),
        secure: Accepted::of(request.extensions()).is_some_and(Accepted::secure),
        prefix: if hop == Hop::Peer {
            Prefix::FromPeer
        } else if on_subdomain {
            Prefix::Root
        } else {
            // Not `format!`: its machinery costs several times the copy, on every request.
            let mut prefix = String::with_capacity("/hosts/".len() + raw_host.len());
            prefix.push_str("/hosts/");
            prefix.push_str(raw_host);
            Prefix::Path(prefix)
        },
    };
    let tunnel = match route_found {
        Route::Local(tunnel) => tunnel,
        Route::Remote(owner) => {
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(forwarded);
            let what = if routing::is_whoowns(&parts.method, rest) {
                Forward::WhoOwns
            } else if is_websocket(&parts) {
                Forward::WebSocket(ClientUpgrade::from_parts(&mut parts, &relay).await?)
            } else {
                Forward::Http(body)
            };
            *route = match (&what, relay.config().routing) {
                (Forward::WebSocket(_), _) => "bridge",
                (_, crate::config::RoutingMode::FlyReplay) => "replay",
                _ => "proxy",
            };
            // Boxed, as every path but the local exchange: the handler's future is moved
            // into a box per request, at the size of its largest path.
            return Box::pin(routing::forward(
                &relay,
                &host,
                owner,
                peer_ip(peer),
                &parts,
                what,
            ))
            .await;
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
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(forwarded);
    if is_websocket(&parts) {
        let upgrade = ClientUpgrade::from_parts(&mut parts, &relay).await?;
        let request = ChannelRequest {
            path,
            query,
            headers: headers::to_host(&parts.headers, peer_ip(peer), &forwarded_of(&parts)),
        };
        // Held for the life of the channel. A channel bridged from a peer relay was
        // counted there, against the real client.
        let slot = if hop == Hop::Peer {
            IpSlot::uncounted()
        } else {
            let client = relay.client_ip(&parts.headers, peer);
            relay
                .channels_per_client()
                .try_take(client)
                .ok_or(ClientError::TooManyClientChannels)?
        };
        let log = relay.config().access_log.map(|format| {
            let entry = access_log::Entry {
                kind: "ws",
                host: raw_host.to_owned(),
                method: parts.method.to_string(),
                path: uri.path().to_owned(),
                status: 101,
                bytes_in: 0,
                bytes_out: 0,
                duration: Duration::ZERO,
                route: "local",
            };
            (format, entry)
        });
        return Box::pin(open_channel(relay, tunnel, upgrade, request, slot, log)).await;
    }
    let path_and_query = match &query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    exchange(relay, tunnel, peer, parts, body, path_and_query, hop).await
}

/// The request the host gets: the client's method, the host-local path, the headers of
/// [`headers::to_host`], and the body (streamed or not: the tunnel decides), which must
/// keep arriving ([`Paced`]).
fn host_request_of(
    parts: &http::request::Parts,
    body: Body,
    path_and_query: &str,
    peer: SocketAddr,
    limits: &crate::limits::Limits,
) -> Result<Request, ClientError> {
    let uri: Uri = path_and_query.parse().map_err(|_| ClientError::BadPath)?;
    let body = if http_body::Body::is_end_stream(&body) {
        body
    } else {
        Body::new(Paced::new(
            body,
            limits.upload_grace,
            limits.min_upload_rate,
        ))
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers::to_host(&parts.headers, peer_ip(peer), &forwarded_of(parts));
    Ok(request)
}

/// One HTTP exchange over the tunnel.
async fn exchange(
    relay: Relay,
    tunnel: TunnelHandle,
    peer: SocketAddr,
    parts: http::request::Parts,
    body: Body,
    path_and_query: String,
    hop: Hop,
) -> Result<Response, ClientError> {
    let timeout = relay.config().limits.exchange_timeout;
    // Refuse before reading a byte of body if the tunnel is full.
    let permit = tunnel.reserve()?;
    let request = host_request_of(&parts, body, &path_and_query, peer, &relay.config().limits)?;
    match tunnel.exchange(permit, request, timeout).await {
        Ok(response) => Ok(response),
        Err(ExchangeFailure::Failed(err)) => Err(err.into()),
        Err(ExchangeFailure::NotDelivered(request)) => {
            Box::pin(redeliver(
                &relay,
                tunnel.host(),
                peer,
                &parts,
                *request,
                hop,
            ))
            .await
        }
    }
}

/// Routes again, once, a request whose tunnel ended (or stopped taking streams) before
/// writing it: replaced by a newer tunnel, closed by a drain, gone. The host never saw
/// it, so any method may go to wherever the host is now.
async fn redeliver(
    relay: &Relay,
    host: &HostId,
    peer: SocketAddr,
    parts: &http::request::Parts,
    request: Request,
    hop: Hop,
) -> Result<Response, ClientError> {
    telemetry::redelivered();
    match routing::route(relay, host, hop.is_hopped()).await {
        Ok(Route::Local(tunnel)) => {
            let permit = tunnel.reserve()?;
            let timeout = relay.config().limits.exchange_timeout;
            tunnel
                .exchange(permit, request, timeout)
                .await
                .map_err(|failure| failure.into_error().into())
        }
        Ok(Route::Remote(owner)) => {
            let body = Forward::Http(request.into_body());
            routing::forward(relay, host, owner, peer_ip(peer), parts, body).await
        }
        Err(ClientError::HostNotConnected) if hop.is_hopped() => Ok(hop.host_not_here()),
        Err(err) => Err(err),
    }
}

/// A WebSocket channel over the tunnel: opened at the host first, so the host's refusal
/// (its local service's answer) or its choice of subprotocol reaches the client in the
/// handshake; then the client's upgrade, and frames both ways. `slot` (the channel's
/// place among its client's) is held for the life of the channel.
async fn open_channel(
    relay: Relay,
    tunnel: TunnelHandle,
    upgrade: ClientUpgrade,
    request: ChannelRequest,
    slot: IpSlot,
    log: Option<(access_log::Format, access_log::Entry)>,
) -> Result<Response, ClientError> {
    let started = Instant::now();
    let span = debug_span!("channel", host = %tunnel.host(), path = %request.path);
    let limits = &relay.config().limits;
    let (channel, protocol) = match tunnel
        .open_channel(request, limits.exchange_timeout)
        .await?
    {
        Opened::Channel { channel, protocol } => (channel, protocol),
        Opened::Refused(response) => return Ok(response.map(Body::new)),
    };
    let protocol = protocol.as_ref().and_then(|p| p.to_str().ok());
    let ping_interval = limits.ping_interval;
    Ok(upgrade.accept(
        limits,
        protocol,
        relay.tracker(),
        span,
        move |socket| async move {
            let _slot = slot;
            telemetry::channel_open(1.0);
            let (bytes_in, bytes_out) = run_channel(socket, channel, ping_interval).await;
            telemetry::channel_open(-1.0);
            if let Some((format, mut entry)) = log {
                entry.bytes_in = bytes_in;
                entry.bytes_out = bytes_out;
                entry.duration = started.elapsed();
                entry.write(format);
            }
        },
    ))
}

/// Carries frames between the client socket and the channel until either side closes.
/// Each side waits for the other to take a frame: a slow reader slows its writer.
///
/// The client is pinged every `ping_interval`; one that has sent nothing (no pong, no
/// frame) for two intervals is gone (a NAT dropped it, it vanished without a FIN): the
/// channel is closed and the host told 1001, instead of a half-open socket holding the
/// channel, and the host's local socket, for ever.
///
/// Returns the frame bytes carried from the client and to it.
async fn run_channel(
    mut socket: ClientSocket,
    mut channel: Channel,
    ping_interval: Duration,
) -> (u64, u64) {
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            // Host events first: everything the host sent before its close is delivered
            // before the close.
            biased;
            event = channel.recv() => match event {
                ChannelEvent::Frame(frame) => {
                    telemetry::bytes("from_host", frame.len());
                    bytes_out += frame.len() as u64;
                    if let Err(failed) = socket.send(frame).await {
                        // A client that stopped reading (the write timed out) is what a
                        // full queue also reports to the host: 1013, try again later.
                        let code = (failed == SendFailed::TimedOut)
                            .then_some(close_code::TRY_AGAIN_LATER);
                        channel.close(code).await;
                        return (bytes_in, bytes_out);
                    }
                }
                ChannelEvent::Closed(code) => {
                    socket.close(code, "").await;
                    channel.close(code).await;
                    return (bytes_in, bytes_out);
                }
            },
            _ = ping.tick() => {
                if heard.elapsed() >= ping_interval * 2 {
                    debug!("client silent for two ping intervals; closing its channel");
                    channel.close(Some(close_code::GOING_AWAY)).await;
                    return (bytes_in, bytes_out);
                }
                if !socket.ping().await {
                    channel.close(Some(close_code::GOING_AWAY)).await;
                    return (bytes_in, bytes_out);
                }
            }
            received = socket.recv() => {
                heard = Instant::now();
                let frame = match received {
                    Received::Frame(frame) => frame,
                    Received::Control => continue,
                    Received::Close(frame) => {
                        channel.close(frame.map(|(code, _)| code)).await;
                        // The socket answers the client's Close as it ends.
                        socket.finish().await;
                        return (bytes_in, bytes_out);
                    }
                    Received::Failed { too_big } => {
                        let code = if too_big { close_code::TOO_BIG } else { close_code::GOING_AWAY };
                        channel.close(Some(code)).await;
                        if too_big {
                            socket.close(Some(code), "").await;
                        }
                        return (bytes_in, bytes_out);
                    }
                    Received::Ended => {
                        channel.close(None).await;
                        return (bytes_in, bytes_out);
                    }
                };
                telemetry::bytes("to_host", frame.len());
                bytes_in += frame.len() as u64;
                if channel.send(frame).await.is_err() {
                    socket.close(Some(close_code::GOING_AWAY), "").await;
                    return (bytes_in, bytes_out);
                }
            }
        }
    }
}

/// How the request's `X-Forwarded-*` are to be treated (set by [`serve`]).
fn forwarded_of(parts: &http::request::Parts) -> headers::Forwarded {
    parts
        .extensions
        .get::<headers::Forwarded>()
        .cloned()
        .unwrap_or_default()
}

/// Whether `path` is for the client side: `/hosts/` and something after it. An empty
/// hostId (`/hosts//x`) is the client side's to refuse (400); `/hosts` and `/hosts/` are
/// no one's (404).
pub(crate) fn is_host_path(path: &str) -> bool {
    path.strip_prefix("/hosts/")
        .is_some_and(|after| !after.is_empty())
}

/// Splits `/hosts/<id>/<rest>` into the raw id segment and `/<rest>` (empty when none).
fn split_host_path(path: &str) -> Option<(&str, &str)> {
    let after = path.strip_prefix("/hosts/")?;
    Some(match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    })
}

/// Whether the request opens a WebSocket: an HTTP/1.1 upgrade, or an HTTP/2 extended
/// CONNECT with `:protocol websocket` (RFC 8441).
fn is_websocket(parts: &http::request::Parts) -> bool {
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    upgrade
        || (parts.method == Method::CONNECT
            && parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")))
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
    fn only_paths_with_something_after_hosts_are_for_the_client_side() {
        for path in [
            "/hosts/h1",
            "/hosts/h1/",
            "/hosts/h1/a/b",
            "/hosts//a",
            "/hosts//",
        ] {
            assert!(is_host_path(path), "{path}");
        }
        for path in ["/hosts", "/hosts/", "/hostsx/h1", "/other/hosts/h1"] {
            assert!(!is_host_path(path), "{path}");
        }
    }
}
