//! The HTTP/2 server of an `h2` tunnel, the agent's side: one connection (`h2`'s, with the
//! limits of [`crate::limits::h2`]) and the streams it carries, all served from the task
//! that drives the connection.
//!
//! hyper's server spawns a task per stream and hands frames between it and the
//! connection's task; at one request at a time those hand-offs were most of what an
//! `h2` exchange cost the agent over a v1 one. Here each stream is a future polled by the
//! connection's own task ([`FuturesUnordered`]): the agent runs on one thread anyway, so
//! nothing is lost, and a request goes from the tunnel's bytes to the upstream and back
//! without waking another task. Flow control, resets and `GOAWAY` stay `h2`'s.
//!
//! A stream is an exchange with the local service (the request body streamed to it, its
//! answer streamed back under the stream's flow control; a stream the relay resets drops
//! the upstream request at once), or a WebSocket channel (RFC 8441 extended CONNECT: the
//! local WebSocket is opened first, then the two byte streams are spliced).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use h2::server::{Handshake, SendResponse};
use h2::{Reason, RecvStream};
use http::header::SEC_WEBSOCKET_PROTOCOL;
use http::{Method, Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::tunnel::Shared;
use super::upstream::Upgrade;
use crate::headers;
use crate::limits::h2 as limits;
use crate::protocol::h2::stream::{RecvBody, StreamIo, send_body};

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One HTTP/2 connection inside the tunnel, and its streams. Resolves when the connection
/// has ended and its last stream is done.
pub(super) struct Connection<T> {
    state: State<T>,
    streams: FuturesUnordered<StreamFuture>,
    shared: Arc<Shared>,
    /// `GOAWAY` asked for before the handshake was done.
    shutdown: bool,
}

enum State<T> {
    Handshaking(Pin<Box<Handshake<T, Bytes>>>),
    /// Boxed: the connection is large, and most of a tunnel's life has none.
    Serving(Box<h2::server::Connection<T, Bytes>>),
    /// The connection ended; streams may still be finishing.
    Closed,
}

impl<T> Connection<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Serves the connection the relay starts over `io`.
    pub(super) fn new(io: T, shared: Arc<Shared>) -> Connection<T> {
        let mut builder = h2::server::Builder::new();
        builder
            .enable_connect_protocol()
            .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(limits::MAX_PENDING_ACCEPT_RESETS)
            .initial_window_size(limits::STREAM_WINDOW)
            .initial_connection_window_size(limits::CONNECTION_WINDOW)
            .max_frame_size(limits::MAX_FRAME)
            .max_header_list_size(limits::MAX_HEADER_LIST)
            .max_send_buffer_size(limits::MAX_SEND_BUFFER);
        Connection {
            state: State::Handshaking(Box::pin(builder.handshake(io))),
            streams: FuturesUnordered::new(),
            shared,
            shutdown: false,
        }
    }

    /// Sends `GOAWAY`: no new stream is taken; the connection ends once the streams in
    /// flight are done.
    pub(super) fn graceful_shutdown(&mut self) {
        self.shutdown = true;
        if let State::Serving(conn) = &mut self.state {
            conn.graceful_shutdown();
        }
    }
}

impl<T> Future for Connection<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = Result<(), h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let State::Handshaking(handshake) = &mut this.state {
            let mut conn = match handshake.as_mut().poll(cx) {
                Poll::Ready(Ok(conn)) => conn,
                Poll::Ready(Err(err)) => {
                    this.state = State::Closed;
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => return Poll::Pending,
            };
            if this.shutdown {
                conn.graceful_shutdown();
            }
            this.state = State::Serving(Box::new(conn));
        }
        loop {
            // Streams first, so what they queue is written by the connection's poll
            // below, in the same turn.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            let State::Serving(conn) = &mut this.state else {
                break;
            };
            let mut accepted = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        this.streams
                            .push(Box::pin(serve(this.shared.clone(), request, respond)));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(err))) => {
                        this.state = State::Closed;
                        return Poll::Ready(Err(err));
                    }
                    Poll::Ready(None) => {
                        this.state = State::Closed;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !accepted {
                break;
            }
        }
        match this.state {
            // Streams cannot go on without their connection.
            State::Closed => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }
}

/// Serves one stream: a WebSocket channel, or an exchange with the local service.
async fn serve(shared: Arc<Shared>, request: Request<RecvStream>, respond: SendResponse<Bytes>) {
    if is_websocket_connect(&request) {
        open_channel(&shared, request, respond).await;
    } else {
        exchange(&shared, request, respond).await;
    }
}

/// One exchange: the request to the local service (its body streamed as the relay sends
/// it), the answer back. A reset from the relay (its client went away) drops the
/// upstream request at once.
async fn exchange(shared: &Shared, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let (parts, recv) = request.into_parts();
    let body = RecvBody::new(recv, &parts.headers);
    let request = Request::from_parts(parts, Body::new(body));
    let answer = {
        let upstream = shared.upstream.send(request);
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        tokio::select! {
            answer = upstream => answer,
            _ = reset => return,
        }
    };
    let response = match answer {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            headers::from_upstream(&mut head.headers);
            Response::from_parts(head, Body::new(body))
        }
        Err(failure) => failure.response(),
    };
    respond_with(respond, response).await;
}

/// Sends `response`: its head, then its body under the stream's flow control.
async fn respond_with(mut respond: SendResponse<Bytes>, response: Response<Body>) {
    let (head, body) = response.into_parts();
    let end = body.is_end_stream();
    let head = Response::from_parts(head, ());
    let stream = match respond.send_response(head, end) {
        Ok(stream) => stream,
        Err(err) => {
            debug!(error = %err, "could not send a response head");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !end && let Err(err) = send_body(stream, body).await {
        debug!(error = %err, "a response body did not go out whole");
    }
}

/// Whether the relay opens a WebSocket channel (RFC 8441 extended CONNECT).
fn is_websocket_connect(request: &Request<RecvStream>) -> bool {
    request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<h2::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Opens the local WebSocket, then answers the CONNECT with its subprotocol and splices
/// the two byte streams until either side ends: the relay's frames are client frames,
/// which is what the local service expects, and the service's are server frames, which
/// is what the relay expects, so nothing is parsed and close codes pass untouched.
async fn open_channel(
    shared: &Shared,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let opened = {
        let upgrade = shared.upstream.upgrade(&path, request.headers());
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        tokio::select! {
            opened = upgrade => opened,
            _ = reset => return,
        }
    };
    let mut local = match opened {
        Ok(Upgrade::Open(local)) => local,
        Ok(Upgrade::Refused(response)) => return respond_with(respond, response).await,
        Err(failure) => return respond_with(respond, failure.response()).await,
    };
    let mut head = Response::new(());
    if let Some(protocol) = local.response.headers().get(SEC_WEBSOCKET_PROTOCOL) {
        head.headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }
    let send = match respond.send_response(head, false) {
        Ok(send) => send,
        Err(err) => {
            debug!(error = %err, "could not answer a channel's CONNECT");
            return;
        }
    };
    let mut relay_io = StreamIo::new(send, request.into_body());
    // Ends when either side ends its stream (after the close handshake) or fails (the
    // stream was reset, the tunnel or the service went away).
    let _ = tokio::io::copy_bidirectional(&mut relay_io, &mut local.io)
        .map(|_| ())
        .await;
}
