//! The host side: `GET /tunnel?hostId=<id>` turns a host agent's WebSocket into a tunnel;
//! `GET /v2/control?hostId=<id>&token=<jwt>` does the same for superset's v2 hosts (their
//! control channel; their dials are [`crate::dial`]'s).
//!
//! Registration order matters: the tunnel is put in the local registry before it is
//! published in the directory, so a request routed here by the directory always finds it;
//! and when it ends it is removed from the directory only if it was still the registered
//! tunnel (compare-and-delete on both levels).

use std::net::SocketAddr;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};
use serde_json::json;
use tracing::{Instrument, info, info_span};

use crate::auth::{AuthError, Role, bearer_token};
use crate::budget::TunnelBudget;
use crate::config::RoutingMode;
use crate::connections::{Accepted, ReadCharge};
use crate::error::ClientError;
use crate::host_id::HostId;
use crate::limits::{self, CLOSE_TIMEOUT};
use crate::listener::PeerAddr;
use crate::ownership;
use crate::protocol::{close_code, h2};
use crate::state::Relay;
use crate::telemetry;
use crate::tunnel::{Protocol, TunnelHandle};

/// Why a tunnel registration was refused. The agent is at fault; it gets close 1008.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("missing hostId query parameter")]
    MissingHostId,
    #[error("{0}")]
    InvalidHostId(#[from] crate::host_id::InvalidHostId),
    #[error("{0}")]
    Auth(#[from] AuthError),
}

/// Which door a host came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// `GET /tunnel`: v1, or `h2` when the agent offers it.
    Tunnel,
    /// `GET /v2/control`: superset's v2 control channel.
    V2Control,
}

/// `GET /tunnel?hostId=<id>`.
pub(crate) async fn accept(
    State(relay): State<Relay>,
    PeerAddr(peer): PeerAddr,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    accepted: Option<Extension<Accepted>>,
) -> Response {
    let reads = accepted.map(|Extension(accepted)| accepted.reads().clone());
    let arrival = Arrival {
        peer,
        headers,
        query,
        reads,
    };
    register(relay, upgrade, arrival, Door::Tunnel).await
}

/// `GET /v2/control?hostId=<id>&token=<jwt>`: a superset v2 host's control channel.
/// Refusals close with superset's codes (4400 bad request, 4401 token, 4403 access).
pub(crate) async fn accept_v2(
    State(relay): State<Relay>,
    PeerAddr(peer): PeerAddr,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    accepted: Option<Extension<Accepted>>,
) -> Response {
    let reads = accepted.map(|Extension(accepted)| accepted.reads().clone());
    let arrival = Arrival {
        peer,
        headers,
        query,
        reads,
    };
    register(relay, upgrade, arrival, Door::V2Control).await
}

/// What a registration request brought.
struct Arrival {
    peer: SocketAddr,
    headers: HeaderMap,
    query: Option<String>,
    reads: Option<ReadCharge>,
}

async fn register(
    relay: Relay,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    arrival: Arrival,
    door: Door,
) -> Response {
    let Arrival {
        peer,
        headers,
        query,
        reads,
    } = arrival;
    let Ok(upgrade) = upgrade else {
        return ClientError::NotWebSocket.into_response();
    };
    if relay.is_draining() {
        telemetry::admission_rejected("draining");
        return draining_refusal(&relay);
    }
    // The token is checked before the admission bucket is spent: a flood of bad
    // upgrades must not use up the registrations of the agents that hold good ones.
    let authorized = authorize(&relay, &headers, query.as_deref()).await;
    if authorized.is_ok()
        && let Err(wait) = relay.admit()
    {
        telemetry::admission_rejected("rate");
        return too_many_registrations(wait);
    }
    let wants_h2 = door == Door::Tunnel && offers_h2(&headers);
    let mut upgrade = crate::websocket::configure(upgrade, &relay.config().limits);
    if door == Door::V2Control {
        upgrade = upgrade
            .max_message_size(limits::v2::MAX_CONTROL_MESSAGE)
            .max_frame_size(limits::v2::MAX_CONTROL_MESSAGE);
    }
    if wants_h2 {
        // Binary messages carry HTTP/2 bytes in chunks of at most 64 KiB: a lower cap
        // than v1's whole-body frames.
        upgrade = upgrade
            .protocols([h2::SUBPROTOCOL])
            .max_message_size(limits::h2::MAX_TUNNEL_MESSAGE)
            .max_frame_size(limits::h2::MAX_TUNNEL_MESSAGE);
    }
    let tracker = relay.tracker().clone();
    let base_domain = relay.config().base_domain.clone();
    let mut response = match authorized {
        Ok((host, subject)) => upgrade.on_upgrade(move |socket| {
            let protocol = if door == Door::V2Control {
                Protocol::V2
            } else if socket.protocol().is_some_and(|p| p == h2::SUBPROTOCOL) {
                Protocol::H2
            } else {
                Protocol::V1
            };
            let tunnel = Tunnel {
                protocol,
                host,
                subject,
                peer,
                reads,
            };
            tracker.track_future(serve_tunnel(relay, socket, tunnel))
        }),
        Err(refusal) => {
            if let Refusal::Auth(err) = &refusal {
                telemetry::auth_failed("tunnel", err.kind());
            }
            if !relay.refusals().record(relay.client_ip(&headers, peer)) {
                // A flood from one address: the cheapest answer, no upgrade, no log line.
                telemetry::admission_rejected("refusals");
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, HeaderValue::from_static("60"))],
                    axum::Json(
                        json!({"error": "too many refused registrations from this address"}),
                    ),
                )
                    .into_response();
            }
            telemetry::tunnel_refused(&peer, &refusal);
            let (code, reason) = match door {
                Door::Tunnel => (close_code::POLICY, refusal.to_string()),
                Door::V2Control => refusal.v2_close(),
            };
            return upgrade
                .on_upgrade(move |socket| tracker.track_future(refuse(socket, code, reason)))
                .into_response();
        }
    }
    .into_response();
    if door == Door::Tunnel
        && let Some(Ok(base)) = base_domain.as_deref().map(HeaderValue::from_str)
    {
        response
            .headers_mut()
            .insert(crate::protocol::BASE_DOMAIN_HEADER, base);
    }
    response
}

/// Whether the agent asks for protocol `h2` (the `relay-h2` WebSocket subprotocol).
fn offers_h2(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == h2::SUBPROTOCOL)
}

/// A draining relay points new tunnels elsewhere: on Fly, `fly-replay: elsewhere=true`
/// makes the proxy retry the upgrade on another machine; elsewhere, 503 with
/// `Retry-After: 0` tells the agent to try another relay now, without growing its backoff.
fn draining_refusal(relay: &Relay) -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"error": "relay draining; reconnect to another relay"})),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
    if relay.config().routing == RoutingMode::FlyReplay {
        headers.insert("fly-replay", HeaderValue::from_static("elsewhere=true"));
    }
    response
}

/// Over the admission rate: 429 with `Retry-After` in whole seconds, rounded up and never
/// 0, so an agent that honours it finds a token when it comes back.
fn too_many_registrations(wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({"error": "too many tunnel registrations; retry later"})),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn authorize(
    relay: &Relay,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(HostId, String), Refusal> {
    let raw = query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "hostId")
                .map(|(_, v)| v.into_owned())
        })
        .ok_or(Refusal::MissingHostId)?;
    let host = HostId::parse(&raw)?;
    let token = bearer_token(headers, query).ok_or(AuthError::Missing)?;
    let claims = relay
        .verifier()
        .authorize(&token, Role::Host, &host)
        .await?;
    let tenant = relay.verifier().tenant(&claims, &host);
    Ok((host, tenant))
}

impl Refusal {
    /// The close code and reason of a refused v2 control channel, in superset's codes.
    fn v2_close(&self) -> (u16, String) {
        use crate::protocol::v2::close;
        let code = match self {
            Refusal::MissingHostId | Refusal::InvalidHostId(_) => close::BAD_REQUEST,
            Refusal::Auth(err) => match err.status() {
                StatusCode::UNAUTHORIZED => close::AUTH_EXPIRED,
                StatusCode::FORBIDDEN => close::FORBIDDEN,
                // Keys or the access check unavailable: not the host's fault, try again.
                _ => close_code::TRY_AGAIN_LATER,
            },
        };
        (code, self.to_string())
    }
}

/// Closes a refused tunnel with `code` (1008 for `/tunnel`) and the reason, then waits
/// briefly for the agent's Close so it reads the code rather than a reset.
async fn refuse(mut socket: WebSocket, code: u16, reason: String) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: crate::websocket::close_reason(&reason).into(),
            })))
            .await?;
        while let Some(message) = socket.next().await {
            if matches!(message?, Message::Close(_)) {
                break;
            }
        }
        Ok::<_, axum::Error>(())
    })
    .await;
}

/// Who registered a tunnel, and how.
struct Tunnel {
    protocol: Protocol,
    host: HostId,
    subject: String,
    peer: SocketAddr,
    /// The connection's read charge (absent only for sockets not accepted by
    /// [`crate::connections`], as in unit tests).
    reads: Option<ReadCharge>,
}

/// Runs one registered tunnel from registration to unregistration.
async fn serve_tunnel(relay: Relay, socket: WebSocket, tunnel: Tunnel) {
    let Tunnel {
        protocol,
        host,
        subject,
        peer,
        reads,
    } = tunnel;
    let limits = &relay.config().limits;
    let (handle, session) = TunnelHandle::open(
        host.clone(),
        protocol,
        socket,
        limits,
        TunnelBudget::new(
            limits.tunnel_budget,
            &relay.tenants().of(&subject),
            relay.memory(),
        ),
        relay.shutdown_token(),
        relay.tracker(),
        relay.v2(),
    );
    let span =
        info_span!("tunnel", host = %host, tunnel = %handle.id(), protocol = protocol.as_str());
    async move {
        if let Some(old) = relay.registry().insert(handle.clone()) {
            info!(old = %old.id(), "replacing the previous tunnel for this host");
            old.close(close_code::REPLACED);
        }
        telemetry::tunnel_registered(protocol.as_str());
        info!(%peer, sub = %subject, "tunnel registered");
        // Serve at once; the directory write runs beside the session, so a slow or hung
        // Redis delays nothing local (requests, pings). Unregistering waits for it, so the
        // two writes can never land out of order.
        let publish = relay.tracker().spawn({
            let relay = relay.clone();
            let handle = handle.clone();
            async move {
                let synced = ownership::publish(&relay, handle.host()).await;
                handle.set_synced(synced);
                // A first ping now (v1 allows one at any time) tells the agent the tunnel
                // is registered and routable: an agent moving off a draining relay waits
                // for it before letting its old tunnel go.
                handle.ping_now();
            }
            .in_current_span()
        });

        let on_pong = {
            let relay = relay.clone();
            let handle = handle.clone();
            // At most one heartbeat per half ping interval: the entry's TTL spans three
            // intervals, and a host that sends pongs unasked (thousands a second) must
            // not turn each one into a directory write.
            let spacing = relay.config().limits.ping_interval / 2;
            let last = std::sync::Mutex::new(None::<tokio::time::Instant>);
            move || {
                if handle.has_moved() {
                    return;
                }
                let now = tokio::time::Instant::now();
                {
                    // Held for the comparison only.
                    let mut last = last
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if last.is_some_and(|at| now.duration_since(at) < spacing) {
                        return;
                    }
                    *last = Some(now);
                }
                ownership::heartbeat(&relay, handle.host());
            }
        };
        // A v1 tunnel's messages may be 16 MiB, assembled unseen: past an allowance, what
        // is read for one is charged against the tunnel's budgets until it is whole.
        if let Some(reads) = &reads {
            reads.read_ahead();
        }
        let reads = reads.filter(|_| protocol == Protocol::V1);
        if let Some(reads) = &reads {
            reads.start_tunnel(handle.budget());
        }
        let on_message = move |control| {
            if let Some(reads) = &reads {
                reads.message_done(control);
            }
        };
        let end = session.run(on_pong, on_message).await;
        info!(reason = end.label(), detail = ?end, "tunnel closed");
        telemetry::tunnel_unregistered(protocol.as_str(), end.label());

        let _ = publish.await;
        // A host that moved elsewhere has no entry of ours left to remove (the
        // compare-and-delete would find another owner): a drain of thousands of tunnels
        // spares Redis that many scripts.
        if relay.registry().remove(&host, handle.id()) && !handle.has_moved() {
            ownership::unpublish(&relay, &host).await;
        }
    }
    .instrument(span)
    .await;
}
