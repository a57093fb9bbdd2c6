//! The host side of superset's v2 streams: `GET /v2/dial?hostId=<id>&ticket=<t>`, the
//! WebSocket a host dials back for one stream ([`crate::tunnel::v2`]).
//!
//! The ticket is the dial's only credential: unguessable (128 random bits), good once,
//! for one host, and only while its stream waits (the dial timeout). A dial with an
//! unknown, used or expired ticket is accepted and closed 4404 at once, so the host reads
//! why. A dial never lingers unpaired: its socket goes straight to the stream waiting
//! for it, or is closed.
//!
//! A ticket names the machine that issued it. A dial that lands on another machine of
//! the fleet is bridged there over the relays' network, as client WebSockets are (Fly's
//! replay cannot carry a WebSocket upgrade); a dial forwarded once is never forwarded
//! again.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use tracing::debug_span;

use crate::client_socket::ClientUpgrade;
use crate::clients::peer_ip;
use crate::host_id::HostId;
use crate::listener::PeerAddr;
use crate::protocol::v2::{Ticket, close};
use crate::routing::{self, Hop};
use crate::state::Relay;
use crate::telemetry;

/// `GET /v2/dial?hostId=<id>&ticket=<t>`.
pub(crate) async fn accept(
    State(relay): State<Relay>,
    PeerAddr(peer): PeerAddr,
    request: Request,
) -> Response {
    let (mut parts, _body) = request.into_parts();
    let upgrade = match ClientUpgrade::from_parts(&mut parts, &relay).await {
        Ok(upgrade) => upgrade,
        Err(err) => return err.into_response(),
    };
    let (host, ticket) = match dial_params(parts.uri.query()) {
        Ok(params) => params,
        Err(why) => return close_at_once(&relay, upgrade, close::BAD_REQUEST, why),
    };
    let Some(parsed) = Ticket::parse(&ticket) else {
        telemetry::dial("unknown_ticket");
        return close_at_once(&relay, upgrade, close::UNKNOWN_TICKET, UNKNOWN);
    };
    if parsed.issuer() != &relay.config().owner {
        let key = if parts.headers.contains_key(crate::headers::HOP_NAME) {
            relay.hop_key().await
        } else {
            None
        };
        if Hop::of(&parts.headers, key.as_deref()).is_hopped() {
            // Forwarded here, yet not issued here: the ticket is not ours to honour.
            telemetry::dial("unknown_ticket");
            return close_at_once(&relay, upgrade, close::UNKNOWN_TICKET, UNKNOWN);
        }
        let issuer = parsed.issuer().clone();
        if crate::ownership::address_of(&relay, &issuer)
            .await
            .is_none()
        {
            // No such machine in the fleet now (gone, or never was): the stream it waited
            // for is gone with it.
            telemetry::dial("unknown_ticket");
            return close_at_once(&relay, upgrade, close::UNKNOWN_TICKET, UNKNOWN);
        }
        telemetry::dial("forwarded");
        return match routing::bridge_websocket(
            &relay,
            &host,
            issuer,
            peer_ip(peer),
            &parts,
            upgrade,
        )
        .await
        {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
    }
    let Some(waiting) = relay.v2().dials.take(&ticket, &host) else {
        telemetry::dial("unknown_ticket");
        return close_at_once(&relay, upgrade, close::UNKNOWN_TICKET, UNKNOWN);
    };
    telemetry::dial("paired");
    let span = debug_span!("dial", %host);
    upgrade.accept(
        &relay.config().limits,
        None,
        relay.tracker(),
        span,
        move |socket| async move {
            // The stream gave up between the ticket's check and the upgrade.
            if let Err(socket) = waiting.send(Box::new(socket)) {
                socket
                    .close(Some(close::UNKNOWN_TICKET), "Stream expired")
                    .await;
            }
        },
    )
}

/// The reason of a 4404.
const UNKNOWN: &str = "Unknown or expired ticket";

/// `hostId` and `ticket` from the query.
fn dial_params(query: Option<&str>) -> Result<(HostId, String), &'static str> {
    let mut host = None;
    let mut ticket = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "hostId" => host = Some(value.into_owned()),
            "ticket" => ticket = Some(value.into_owned()),
            _ => {}
        }
    }
    match (host, ticket) {
        (Some(host), Some(ticket)) if !ticket.is_empty() => {
            let host = HostId::parse(&host).map_err(|_| "Invalid hostId")?;
            Ok((host, ticket))
        }
        _ => Err("Missing hostId or ticket"),
    }
}

/// Accepts the WebSocket and closes it at once with `code` and `reason`: the only way a
/// WebSocket client can read why (a non-101 answer shows as a failed handshake).
fn close_at_once(
    relay: &Relay,
    upgrade: ClientUpgrade,
    code: u16,
    reason: &'static str,
) -> Response {
    upgrade.accept(
        &relay.config().limits,
        None,
        relay.tracker(),
        tracing::Span::none(),
        move |socket| socket.close(Some(code), reason),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dial_needs_a_host_and_a_ticket() {
        let (host, ticket) = dial_params(Some("hostId=org%3Am1&ticket=abc")).unwrap();
        assert_eq!(host.as_str(), "org:m1");
        assert_eq!(ticket, "abc");
        assert_eq!(
            dial_params(Some("hostId=h1")),
            Err("Missing hostId or ticket")
        );
        assert_eq!(
            dial_params(Some("ticket=t")),
            Err("Missing hostId or ticket")
        );
        assert_eq!(
            dial_params(Some("hostId=h1&ticket=")),
            Err("Missing hostId or ticket")
        );
        assert_eq!(dial_params(None), Err("Missing hostId or ticket"));
        assert_eq!(
            dial_params(Some("hostId=a/b&ticket=t")),
            Err("Invalid hostId")
        );
    }
}
