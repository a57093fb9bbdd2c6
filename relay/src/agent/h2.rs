//! An `h2` tunnel, the agent's side: an HTTP/2 server (hyper) in front of the local
//! service, over the tunnel's WebSocket ([`crate::protocol::h2`]).
//!
//! Each stream the relay opens is one request to the local service, streamed both ways
//! under HTTP/2 flow control: a client that reads slowly slows the local service, and a
//! stream the relay resets (its client went away) drops the upstream request at once. A
//! WebSocket channel is an extended CONNECT (RFC 8441): the agent upgrades a connection
//! to the local service first, answers with its subprotocol (or passes its refusal on),
//! then splices the two byte streams: the relay's frames are client frames, which is what
//! the local service expects, and the service's frames are server frames, which is what
//! the relay expects, so nothing is parsed here and close codes pass through untouched.
//!
//! The control plane (text messages) is v1's: `ping` is answered with `pong`, `drain`
//! starts the move to a new tunnel; once that one is registered (and
//! [`crate::limits::agent::DRAINED_TUNNEL_LINGER`] later) this one says `GOAWAY`, so the
//! relay sends new requests elsewhere while the streams in flight finish.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use http::header::SEC_WEBSOCKET_PROTOCOL;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::config::RelayUrl;
use super::tunnel::{Alarm, EndCause, Shared, Socket, TunnelEnd, Watchdogs};
use super::upstream::Upgrade;
use crate::headers;
use crate::limits::agent::CLOSE_GRACE;
use crate::limits::h2 as limits;
use crate::protocol::close_code;
use crate::protocol::h2::{Ended, Executor, WsIo};
use crate::protocol::v1::{Decoded, HostMessage, RelayMessage};

/// Serves an open `h2` tunnel until it ends.
pub(super) async fn serve(
    shared: Arc<Shared>,
    relay: RelayUrl,
    mut watchdogs: Watchdogs,
    socket: Socket,
    cancel: CancellationToken,
) -> TunnelEnd {
    let (io, control, mut inbox) = WsIo::new(socket, || {
        debug!("control messages from the relay arrive faster than they are read; dropped one");
    });
    let service = {
        let shared = shared.clone();
        service_fn(move |request| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, request).await) }
        })
    };
    let conn = hyper::server::conn::http2::Builder::new(Executor(shared.tasks.clone()))
        .enable_connect_protocol()
        .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(limits::STREAM_WINDOW)
        .initial_connection_window_size(limits::CONNECTION_WINDOW)
        .max_frame_size(limits::MAX_FRAME)
        .max_header_list_size(limits::MAX_HEADER_LIST)
        .max_send_buf_size(limits::MAX_SEND_BUFFER)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // Set once this side started to end the tunnel (GOAWAY sent): how it ends then.
    let mut ending: Option<EndCause> = None;
    let shutdown_deadline = sleep(CLOSE_GRACE);
    tokio::pin!(shutdown_deadline);
    let cause = loop {
        tokio::select! {
            biased;
            () = cancel.cancelled(), if ending.is_none() => {
                control.close_on_shutdown(close_code::NORMAL, "agent shutting down");
                conn.as_mut().graceful_shutdown();
                shutdown_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + CLOSE_GRACE);
                ending = Some(EndCause::Shutdown);
            }
            () = &mut shutdown_deadline, if ending == Some(EndCause::Shutdown) => {
                break EndCause::Shutdown;
            }
            result = &mut conn => {
                if let Some(cause) = ending.take() {
                    break cause;
                }
                break match control.ended() {
                    Some(Ended::PeerClosed(frame)) => {
                        let (code, reason) = frame.map_or((None, String::new()), |(c, r)| (Some(c), r));
                        EndCause::RelayClosed { code, reason }
                    }
                    Some(Ended::Gone(why)) => EndCause::Transport(why),
                    Some(Ended::TooBig) => {
                        EndCause::Transport("the relay sent a message over the size limit".into())
                    }
                    Some(Ended::Closed(_)) | None => EndCause::Transport(match result {
                        Ok(()) => "HTTP/2 connection ended".into(),
                        Err(err) => format!("HTTP/2 connection failed: {err}"),
                    }),
                };
            }
            text = inbox.recv() => {
                let Some(text) = text else { continue };
                watchdogs.heard(true);
                match RelayMessage::parse(&text) {
                    Decoded::Message(RelayMessage::Ping) => {
                        control.send_text(HostMessage::Pong.to_json());
                    }
                    Decoded::Message(RelayMessage::Drain { reason }) => {
                        watchdogs.drain(reason.map(Cow::into_owned));
                    }
                    Decoded::Message(_) => debug!("ignored a v1 exchange message on an h2 tunnel"),
                    Decoded::UnknownType(kind) => debug!(%kind, "ignored a message of unknown type"),
                    Decoded::Malformed { reason, .. } => debug!(%reason, "ignored a malformed message"),
                }
            }
            alarm = watchdogs.next_alarm(), if ending.is_none() => match alarm {
                Alarm::Silence(after) => break EndCause::Silence(after),
                Alarm::Finish => {
                    // GOAWAY: the relay routes new requests to the newer tunnel; the
                    // connection ends (Close 1000) once the streams in flight are done.
                    control.close_on_shutdown(close_code::NORMAL, "drained");
                    conn.as_mut().graceful_shutdown();
                    ending = Some(EndCause::Drained);
                }
            },
        }
    };
    debug!(relay = %relay, %cause, "tunnel closed");
    TunnelEnd::Ended {
        registered_for: watchdogs.registered_for(),
        cause,
    }
}

/// Answers one stream: a WebSocket channel, or an exchange with the local service.
async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    if is_websocket_connect(&request) {
        return open_channel(shared, request).await;
    }
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, Body::new(body));
    match shared.upstream.send(request).await {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            headers::from_upstream(&mut head.headers);
            head.version = Version::HTTP_2;
            Response::from_parts(head, Body::new(body))
        }
        Err(failure) => failure.response(),
    }
}

/// Whether the relay opens a WebSocket channel (RFC 8441 extended CONNECT).
fn is_websocket_connect(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Opens the local WebSocket, then answers the CONNECT with its subprotocol and splices
/// the two streams until either side ends.
async fn open_channel(shared: &Shared, mut request: Request<Incoming>) -> Response<Body> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let local = match shared.upstream.upgrade(&path, request.headers()).await {
        Ok(Upgrade::Open(local)) => local,
        Ok(Upgrade::Refused(response)) => return response,
        Err(failure) => return failure.response(),
    };
    let protocol = local
        .response
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)
        .cloned();
    let on_upgrade = hyper::upgrade::on(&mut request);
    let mut local_io = local.io;
    shared.tasks.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut relay_io = TokioIo::new(upgraded);
                // Ends when either side ends its stream (after the close handshake) or
                // fails (the stream was reset, the tunnel or the service went away).
                let _ = tokio::io::copy_bidirectional(&mut relay_io, &mut local_io).await;
            }
            Err(err) => debug!(error = %err, "the relay's side of a channel never opened"),
        }
    });
    let mut response = Response::new(Body::empty());
    if let Some(protocol) = protocol {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}
