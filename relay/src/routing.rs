//! Routing a client request to the machine that holds the host's tunnel.
//!
//! - `proxy` mode: HTTP is forwarded to the owner's advertised address and the response
//!   streamed back; a WebSocket is bridged frame by frame.
//! - `fly-replay` mode: HTTP gets an empty answer with `fly-replay: instance=<owner>`, and
//!   Fly's proxy replays the request on the owner; a WebSocket upgrade cannot be replayed,
//!   so it is bridged over the private network (`<machine>.vm.<app>.internal`).
//!
//! Every forwarded request carries [`HOP_HEADER`]; a relay that receives one (or a Fly
//! replay, marked by `fly-replay-src`) serves it only from a local tunnel and never
//! forwards it again, so a stale directory can never cause a loop. When the relay it was
//! forwarded to does not hold the host after all (the agent moved between the lookup and
//! the hop), that relay answers 503 with [`NOT_HERE_HEADER`]; nothing reached a host, so
//! the forwarding relay looks the host up again and, if it names another machine, tries
//! that one, once.
//!
//! A host whose relay let it go while draining is *moving* (`ownership::retire`): a
//! request for it is held (at most [`HOLD_FOR_MOVING_HOST`]) until the host registers
//! again, here or elsewhere, and then served, instead of being told the host is not
//! connected. Superset's v2 hosts need it (they learn of a drain only by their control
//! channel closing); so do agents that ignore the drain message. The client's
//! credentials travel unchanged and the owner checks them again: forwarding never
//! weakens authorization.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use serde_json::json;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, warn};

use crate::body::Handoff;
use crate::client_socket::{ClientSocket, ClientUpgrade, Received};
use crate::config::RoutingMode;
use crate::connections::{ReadCharge, ReadCharged};
use crate::directory::Owner;
use crate::error::ClientError;
use crate::headers;
use crate::host_id::HostId;
use crate::limits::{
    CLOSE_TIMEOUT, HOLD_FOR_MOVING_HOST, HOLD_POLL, PEER_CONNECT_TIMEOUT, PEER_EXCHANGE_MARGIN,
    PEER_REPLAY_BODY,
};
use crate::ownership;
use crate::protocol::{Frame, close_code};
use crate::state::Relay;
use crate::telemetry;
use crate::tunnel::TunnelHandle;

pub use crate::headers::{HOP as HOP_HEADER, NOT_HERE as NOT_HERE_HEADER};

/// Path segment under a host that the relay answers itself: which machine holds it.
pub const WHOOWNS: &str = "/_whoowns";

/// The answer to a forwarded request for a host this machine does not hold.
fn not_here() -> Response {
    let mut response = ClientError::HostNotConnected.into_response();
    response
        .headers_mut()
        .insert(NOT_HERE_HEADER, HeaderValue::from_static("1"));
    response
}

/// Fly's proxy adds this to a replayed request.
pub const FLY_REPLAY_SRC: &str = "fly-replay-src";
const FLY_REPLAY_SRC_NAME: http::HeaderName = http::HeaderName::from_static(FLY_REPLAY_SRC);

/// How a request reached this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Straight from the client (or its load balancer).
    Direct,
    /// Forwarded by a peer relay (proxy mode or a bridged WebSocket).
    Peer,
    /// Replayed by Fly's proxy.
    Replay,
}

impl Hop {
    /// How the request with these headers arrived. A hop marker counts only with the
    /// relays' shared `key` ([`crate::headers::HOP_AUTH`]): one a client sent is
    /// ignored (counted as `relay_hops_total{outcome="forged"}`), so a client can neither
    /// see the relays' internal answers nor pass for a relay.
    pub fn of(headers: &HeaderMap, key: Option<&str>) -> Hop {
        // Names, not strings: a string is parsed again on every lookup.
        if headers.contains_key(crate::headers::HOP_NAME) {
            if headers::hop_authenticated(headers, key) {
                return Hop::Peer;
            }
            telemetry::hop("peer", "forged");
        }
        if headers.contains_key(FLY_REPLAY_SRC_NAME) {
            Hop::Replay
        } else {
            Hop::Direct
        }
    }

    /// Whether the request was already routed once: then only a local tunnel may serve
    /// it, so that it can never loop.
    pub fn is_hopped(self) -> bool {
        self != Hop::Direct
    }

    /// The answer when this machine does not hold the host: a peer relay gets the
    /// [`not_here`] marker so it may try the current owner; anyone else a plain 503.
    pub(crate) fn host_not_here(self) -> Response {
        match self {
            Hop::Peer => not_here(),
            Hop::Direct | Hop::Replay => ClientError::HostNotConnected.into_response(),
        }
    }
}

/// Where a client request for a host goes.
#[derive(Debug)]
pub enum Route {
    /// This machine holds the tunnel.
    Local(TunnelHandle),
    /// Another machine does.
    Remote(Owner),
}

/// Where a request for `host` goes: the local tunnel, or the machine that owns it.
/// `hopped` says the request was already routed here by another machine (or replayed by
/// Fly): then only a local tunnel will do, so a request can never loop.
///
/// A moving host is waited for (`hold`).
///
/// # Errors
/// [`ClientError::HostNotConnected`] when no machine holds a tunnel for `host`, when the
/// directory names this machine but the tunnel is not here (a stale entry), or when the
/// directory cannot be read.
pub async fn route(relay: &Relay, host: &HostId, hopped: bool) -> Result<Route, ClientError> {
    if let Some(tunnel) = relay.registry().get(host) {
        // Draining: once the agent has registered its new tunnel elsewhere, new work goes
        // there; the old tunnel here only finishes what it has.
        if relay.is_draining()
            && !hopped
            && let Some(owner) = ownership::lookup(relay, host).await
            && owner != relay.config().owner
        {
            return Ok(Route::Remote(owner));
        }
        return Ok(Route::Local(tunnel));
    }
    if hopped {
        // The peer's directory named this machine: if it still does, that entry is
        // stale (its removal was lost to an outage), and is removed so the machine
        // that holds the host can take its place.
        debug!(%host, "routed here by a peer but not held here; not forwarding again");
        ownership::remove_stale(relay, host);
        return Err(ClientError::HostNotConnected);
    }
    match ownership::lookup(relay, host).await {
        Some(owner) if owner == relay.config().owner => {
            // The tunnel may have registered (and published) while the lookup was on
            // its way: then it is here now.
            if let Some(tunnel) = relay.registry().get(host) {
                return Ok(Route::Local(tunnel));
            }
            debug!(%host, "directory names this machine but the tunnel is gone (stale)");
            ownership::remove_stale(relay, host);
            Err(ClientError::HostNotConnected)
        }
        Some(owner) => Ok(Route::Remote(owner)),
        None if ownership::is_moving(relay, host).await => hold(relay, host).await,
        None => Err(ClientError::HostNotConnected),
    }
}

/// Waits, at most [`HOLD_FOR_MOVING_HOST`], for a moving host to register again (here, or
/// in the directory), looking every [`HOLD_POLL`]. At most
/// [`crate::limits::MAX_HELD_REQUESTS`] wait at once: past it, 503 at once.
async fn hold(relay: &Relay, host: &HostId) -> Result<Route, ClientError> {
    let Some(_place) = relay.hold_place() else {
        telemetry::held("full");
        return Err(ClientError::HostNotConnected);
    };
    debug!(%host, "host is moving; holding the request until it registers again");
    let deadline = tokio::time::Instant::now() + HOLD_FOR_MOVING_HOST;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(HOLD_POLL).await;
        if let Some(tunnel) = relay.registry().get(host) {
            telemetry::held("found");
            return Ok(Route::Local(tunnel));
        }
        match ownership::lookup(relay, host).await {
            Some(owner) if owner == relay.config().owner => {
                if let Some(tunnel) = relay.registry().get(host) {
                    telemetry::held("found");
                    return Ok(Route::Local(tunnel));
                }
            }
            Some(owner) => {
                telemetry::held("found");
                return Ok(Route::Remote(owner));
            }
            None => {}
        }
    }
    telemetry::held("timeout");
    Err(ClientError::HostNotConnected)
}

/// `GET /relay/holds/{hostId}`: whether this machine holds the host's tunnel, asked by
/// a peer relay whose reconciler found the directory naming this machine for a host it
/// holds itself ([`ownership::peer_holds`]). Only relays may ask (the hop key); to anyone
/// else the route does not exist.
pub(crate) async fn holds(
    axum::extract::State(relay): axum::extract::State<Relay>,
    axum::extract::Path(host): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = relay.hop_key().await;
    if !headers::hop_authenticated(&headers, key.as_deref()) {
        return http::StatusCode::NOT_FOUND.into_response();
    }
    let Ok(host) = HostId::parse(&host) else {
        return http::StatusCode::BAD_REQUEST.into_response();
    };
    axum::Json(json!({"holds": relay.registry().contains(&host)})).into_response()
}

/// What a forwarded request is.
pub(crate) enum Forward {
    /// `GET /hosts/<id>/_whoowns`.
    WhoOwns,
    /// A WebSocket upgrade.
    WebSocket(ClientUpgrade),
    /// One HTTP exchange with its body, streamed.
    Http(Body),
}

/// Serves a request for `host`, whose tunnel `owner` holds, from this machine.
pub(crate) async fn forward(
    relay: &Relay,
    host: &HostId,
    owner: Owner,
    client_ip: IpAddr,
    parts: &http::request::Parts,
    what: Forward,
) -> Result<Response, ClientError> {
    let mode = relay.config().routing;
    match (what, mode) {
        (Forward::WhoOwns, RoutingMode::Proxy) => Ok(axum::Json(json!({
            "ok": true,
            "region": owner.region,
            "machine": owner.machine_id,
        }))
        .into_response()),
        (Forward::WhoOwns | Forward::Http(_), RoutingMode::FlyReplay) => {
            telemetry::hop("replay", "replayed");
            Ok(replay(&owner))
        }
        (Forward::Http(body), RoutingMode::Proxy) => {
            proxy_http(relay, host, owner, client_ip, parts, body).await
        }
        (Forward::WebSocket(upgrade), _) => {
            bridge_websocket(relay, host, owner, client_ip, parts, upgrade).await
        }
    }
}

/// The answer that makes Fly's proxy replay the request on `owner`.
fn replay(owner: &Owner) -> Response {
    let mut response = Response::new(Body::empty());
    if let Ok(value) = HeaderValue::from_str(&format!("instance={}", owner.machine_id)) {
        response.headers_mut().insert("fly-replay", value);
    }
    response
}

/// After a hop that reached no host (a failed connect, or the owner no longer holding
/// it): where the host is now. A host that moved to this very machine meanwhile (in a
/// deploy with two relays, the one it moves to is often the one forwarding) is reached
/// by a hop to this machine's own listener, which serves it as any peer's request: a
/// loopback hop in this race only, instead of a 503 to a client whose host is here.
async fn owner_again(relay: &Relay, host: &HostId) -> Option<Owner> {
    match route(relay, host, false).await {
        Ok(Route::Remote(owner)) => Some(owner),
        Ok(Route::Local(_)) => Some(relay.config().owner.clone()),
        Err(_) => None,
    }
}

/// Headers for the hop: see [`headers::to_peer`]. Without the hop key (the directory
/// could not give it yet) the peer takes the request for a client's: it is still served
/// if the peer holds the host, only not marked as already routed.
async fn hop_headers(relay: &Relay, client_ip: IpAddr, parts: &http::request::Parts) -> HeaderMap {
    let key = relay.hop_key().await;
    // Only a request straight from a client is forwarded; its X-Forwarded-* are kept
    // when the platform's proxy set them, and the prefix is this relay's to say (the
    // client's view: its path or its subdomain).
    let forwarded = parts
        .extensions
        .get::<headers::Forwarded>()
        .cloned()
        .unwrap_or_else(|| headers::Forwarded {
            trusted: relay.config().client_ip_header.is_some(),
            ..headers::Forwarded::default()
        });
    headers::to_peer(
        &parts.headers,
        client_ip,
        &relay.config().owner.to_string(),
        key.as_deref(),
        &forwarded,
    )
}

/// Forwards one HTTP request to the owner and streams its response back; the body
/// streams too. A hop that failed before anything reached a host (a refused connection,
/// or the owner answering that it does not hold the host) is tried once more after a
/// fresh lookup, if the body can still be sent: it was never read (a refused connection
/// reads nothing), or it is small enough ([`PEER_REPLAY_BODY`]) to have been kept.
async fn proxy_http(
    relay: &Relay,
    host: &HostId,
    mut owner: Owner,
    client_ip: IpAddr,
    parts: &http::request::Parts,
    body: Body,
) -> Result<Response, ClientError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let timeout_after_body = relay.config().limits.exchange_timeout + PEER_EXCHANGE_MARGIN;
    let mut body = HopBody::of(body, &parts.headers).await?;
    for attempt in 0..2 {
        let Some(addr) = ownership::address_of(relay, &owner).await else {
            debug!(%owner, "owner has no advertised address");
            if attempt == 0
                && let Some(next) = owner_again(relay, host).await
            {
                owner = next;
                continue;
            }
            break;
        };
        let Some(this_try) = body.next_try() else {
            break;
        };
        let (this_try, ended) = crate::body::watch_end(this_try);
        let mut request = Request::new(this_try);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = match format!("http://{addr}{path}").parse() {
            Ok(uri) => uri,
            Err(_) => {
                warn!(%owner, %addr, "owner advertises an unusable address");
                break;
            }
        };
        *request.headers_mut() = hop_headers(relay, client_ip, parts).await;
        // The deadline for the answer starts once the request body is sent whole.
        let deadline = async {
            let _ = ended.await;
            tokio::time::sleep(timeout_after_body).await;
        };
        let result = tokio::select! {
            result = relay.peers().client.request(request) => Some(result),
            () = deadline => None,
        };
        match result {
            Some(Ok(response)) => {
                if response.headers().contains_key(NOT_HERE_HEADER) {
                    telemetry::hop("proxy", "not_here");
                    if attempt == 0
                        && body.can_retry()
                        && let Some(next) = owner_again(relay, host).await
                        && next != owner
                    {
                        debug!(%host, %owner, %next, "the owner no longer holds the host; trying the new one");
                        owner = next;
                        continue;
                    }
                    return Err(ClientError::HostNotConnected);
                }
                telemetry::hop("proxy", "forwarded");
                let (mut head, incoming) = response.into_parts();
                headers::from_host(&mut head.headers);
                return Ok(Response::from_parts(head, Body::new(incoming)));
            }
            Some(Err(err)) if err.is_connect() => {
                debug!(%owner, %addr, error = %err, attempt, "cannot connect to the owner");
                telemetry::hop("proxy", "connect_failed");
                if attempt == 0
                    && body.can_retry()
                    && let Some(next) = owner_again(relay, host).await
                {
                    owner = next;
                    continue;
                }
                break;
            }
            Some(Err(err)) => {
                warn!(%owner, %addr, error = %err, "forwarding to the owner failed");
                telemetry::hop("proxy", "failed");
                return Err(ClientError::PeerFailed);
            }
            None => {
                telemetry::hop("proxy", "timeout");
                return Err(ClientError::Exchange(crate::tunnel::ExchangeError::Timeout));
            }
        }
    }
    Err(ClientError::HostNotConnected)
}

/// A request body for up to two tries of a hop.
enum HopBody {
    /// Small and whole: kept, so every try sends it.
    Kept(Bytes),
    /// Streamed: handed to a try lazily, so a try that never read it gives it back.
    Streamed(Arc<Mutex<Option<Body>>>),
}

impl HopBody {
    /// Keeps a body that is empty or announced (`Content-Length`) at most
    /// [`PEER_REPLAY_BODY`] bytes; streams any other. Only an announced length is waited
    /// for: a body of unknown length may be a stream the client feeds as answers come.
    async fn of(body: Body, headers: &HeaderMap) -> Result<HopBody, ClientError> {
        let announced = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let small = http_body::Body::is_end_stream(&body)
            || announced.is_some_and(|n| n <= PEER_REPLAY_BODY);
        if !small {
            return Ok(HopBody::Streamed(Arc::new(Mutex::new(Some(body)))));
        }
        let bytes = axum::body::to_bytes(body, PEER_REPLAY_BODY)
            .await
            .map_err(|_| ClientError::Exchange(crate::tunnel::ExchangeError::BodyUnreadable))?;
        Ok(HopBody::Kept(bytes))
    }

    /// The body for the next try, if there is one to send.
    fn next_try(&mut self) -> Option<Body> {
        match self {
            HopBody::Kept(bytes) => Some(Body::from(bytes.clone())),
            HopBody::Streamed(slot) => {
                let body = Handoff::reclaim(slot)?;
                let (handoff, slot_again) = Handoff::new(body);
                *slot = slot_again;
                Some(Body::new(handoff))
            }
        }
    }

    /// Whether a failed try left the body in a state to be sent again.
    fn can_retry(&self) -> bool {
        match self {
            HopBody::Kept(_) => true,
            HopBody::Streamed(slot) => slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some(),
        }
    }
}

/// Bridges a client WebSocket to the owner: connect to the owner first (so its refusal,
/// say a 403, reaches the client as a status), then upgrade the client and carry frames
/// and close codes both ways.
pub(crate) async fn bridge_websocket(
    relay: &Relay,
    host: &HostId,
    mut owner: Owner,
    client_ip: IpAddr,
    parts: &http::request::Parts,
    upgrade: ClientUpgrade,
) -> Result<Response, ClientError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let limits = &relay.config().limits;
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(limits.max_frame_bytes);
    config.max_frame_size = Some(limits.max_frame_bytes);
    for attempt in 0..2 {
        let Some(addr) = ownership::address_of(relay, &owner).await else {
            if attempt == 0
                && let Some(next) = owner_again(relay, host).await
            {
                owner = next;
                continue;
            }
            break;
        };
        let mut request = match tungstenite::client::IntoClientRequest::into_client_request(
            format!("ws://{addr}{path}"),
        ) {
            Ok(request) => request,
            Err(_) => break,
        };
        let headers = hop_headers(relay, client_ip, parts).await;
        for (name, value) in &headers {
            if name != header::CONNECTION && name != header::UPGRADE {
                request.headers_mut().append(name.clone(), value.clone());
            }
        }
        // The owner's messages carry a host's, up to the frame limit, assembled unseen:
        // what this socket reads towards one is charged like a client's.
        let reads = ReadCharge::new(relay.memory());
        let connect = async {
            let stream = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(tungstenite::Error::Io)?;
            let _ = stream.set_nodelay(true);
            tokio_tungstenite::client_async_with_config(
                request,
                ReadCharged::new(stream, &reads),
                Some(config),
            )
            .await
        };
        match timeout(PEER_CONNECT_TIMEOUT * 2, connect).await {
            Ok(Ok((peer, _))) => {
                telemetry::hop("bridge", "forwarded");
                reads.start();
                let shutdown = relay.shutdown_token().clone();
                let span = debug_span!("bridge", %host, %owner);
                return Ok(
                    upgrade.accept(limits, None, relay.tracker(), span, move |client| {
                        bridge(client, peer, reads, shutdown)
                    }),
                );
            }
            Ok(Err(tungstenite::Error::Http(response)))
                if response.headers().contains_key(NOT_HERE_HEADER) =>
            {
                telemetry::hop("bridge", "not_here");
                if attempt == 0
                    && let Some(next) = owner_again(relay, host).await
                    && next != owner
                {
                    owner = next;
                    continue;
                }
                return Err(ClientError::HostNotConnected);
            }
            Ok(Err(tungstenite::Error::Http(response))) => {
                // The owner answered (auth, not connected, ...): pass its verdict on.
                telemetry::hop("bridge", "refused");
                let (head, body) = response.into_parts();
                let body = body.unwrap_or_default();
                let mut out = Response::new(Body::from(body));
                *out.status_mut() = head.status;
                if let Some(ct) = head.headers.get(header::CONTENT_TYPE) {
                    out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
                }
                return Ok(out);
            }
            Ok(Err(err)) => {
                debug!(%owner, %addr, error = %err, attempt, "cannot open a WebSocket to the owner");
                telemetry::hop("bridge", "connect_failed");
            }
            Err(_) => telemetry::hop("bridge", "connect_failed"),
        }
        if attempt == 0
            && let Some(next) = owner_again(relay, host).await
        {
            owner = next;
            continue;
        }
        break;
    }
    Err(ClientError::HostNotConnected)
}

type PeerSocket = tokio_tungstenite::WebSocketStream<ReadCharged<tokio::net::TcpStream>>;

/// Carries frames between the client and the owner until either closes; each side's
/// close code is passed to the other. When this relay shuts down, the client gets 1001
/// (reconnect: it lands on another relay) and the owner a normal close. `peer_reads`
/// charges what the owner's socket reads.
async fn bridge(
    mut client: ClientSocket,
    peer: PeerSocket,
    peer_reads: ReadCharge,
    shutdown: CancellationToken,
) {
    let (mut peer_tx, mut peer_rx) = peer.split();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = timeout(CLOSE_TIMEOUT, peer_tx.send(Message::Close(None))).await;
                client.close(Some(close_code::GOING_AWAY), "relay shutting down").await;
                break;
            }
            received = client.recv() => match received {
                Received::Frame(frame) => {
                    if peer_tx.send(to_peer(frame)).await.is_err() {
                        client.close(Some(close_code::GOING_AWAY), "").await;
                        break;
                    }
                }
                Received::Control => {}
                Received::Close(frame) => {
                    let frame = frame.map(|(code, reason)| CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    });
                    let _ = timeout(CLOSE_TIMEOUT, peer_tx.send(Message::Close(frame))).await;
                    client.finish().await;
                    break;
                }
                Received::Failed { .. } | Received::Ended => {
                    let _ = timeout(CLOSE_TIMEOUT, peer_tx.send(Message::Close(None))).await;
                    break;
                }
            },
            message = peer_rx.next() => {
                if let Some(Ok(message)) = &message {
                    let control = match message {
                        Message::Ping(payload) | Message::Pong(payload) => Some(payload.len()),
                        _ => None,
                    };
                    peer_reads.message_done(control);
                }
                let frame = match message {
                    Some(Ok(Message::Text(text))) => Frame::Text(text.as_str().to_owned()),
                    Some(Ok(Message::Binary(bytes))) => Frame::Binary(bytes),
                    // Each hop answers its own pings.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        match frame {
                            Some(frame) => client.close(Some(frame.code.into()), frame.reason.as_str()).await,
                            None => client.close(None, "").await,
                        }
                        break;
                    }
                    Some(Err(_)) | None => {
                        client.close(Some(close_code::GOING_AWAY), "").await;
                        break;
                    }
                };
                if client.send(frame).await.is_err() {
                    let _ = timeout(CLOSE_TIMEOUT, peer_tx.send(Message::Close(None))).await;
                    break;
                }
            }
        }
    }
    // Flush the reply to a Close that was received, within bounds.
    let _ = timeout(CLOSE_TIMEOUT, peer_tx.close()).await;
}

fn to_peer(frame: Frame) -> Message {
    match frame {
        Frame::Text(text) => Message::Text(text.into()),
        Frame::Binary(bytes) => Message::Binary(bytes),
    }
}

/// Whether `method` and `path` ask the relay itself who owns the host.
pub(crate) fn is_whoowns(method: &Method, rest: &str) -> bool {
    method == Method::GET && rest == WHOOWNS
}
