//! A client's WebSocket, however it arrived: an HTTP/1.1 upgrade, or an extended CONNECT
//! stream of an HTTP/2 connection (RFC 8441).
//!
//! A WebSocket message may be 16 MiB, and the codec holds all of it before the relay sees
//! any, so what a client's socket has read towards a message not yet whole is charged
//! against the process's byte budget ([`ReadCharge`]), and a socket that would pass it is
//! dropped. Over HTTP/1.1 that is the connection's own socket, charged below axum's
//! WebSocket. An HTTP/2 connection carries other streams too, so there the charge is on
//! the stream: the relay answers the CONNECT itself and runs tungstenite over it.
//!
//! Both are used alike, in frames and close codes ([`ClientSocket`]): by a channel to a
//! local tunnel and by a bridge to the relay that holds the host.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method, StatusCode, header};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug};

use crate::connections::{Accepted, ReadCharge, ReadCharged, SendDebt};
use crate::error::ClientError;
use crate::limits::{CLOSE_TIMEOUT, Limits, WS_READ_BUFFER, WS_WRITE_BUFFER};
use crate::protocol::{Frame, close_code};
use crate::state::Relay;

/// A client's request to open a WebSocket, not yet answered.
pub struct ClientUpgrade(Upgrade);

enum Upgrade {
    /// An HTTP/1.1 upgrade, through axum. `reads` charges the connection's socket (absent
    /// when the connection was not accepted by the relay's listener, as in unit tests).
    Http1 {
        upgrade: WebSocketUpgrade,
        reads: Option<ReadCharge>,
    },
    /// An extended CONNECT stream: answered here, its reads charged by `reads`, what it
    /// sends by the connection's `sent`.
    Http2 {
        on_upgrade: OnUpgrade,
        reads: ReadCharge,
        sent: Option<SendDebt>,
    },
}

impl std::fmt::Debug for ClientUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Upgrade::Http1 { .. } => f.write_str("ClientUpgrade(HTTP/1.1)"),
            Upgrade::Http2 { .. } => f.write_str("ClientUpgrade(HTTP/2)"),
        }
    }
}

impl ClientUpgrade {
    /// The upgrade `parts` ask for.
    ///
    /// # Errors
    /// [`ClientError::NotWebSocket`] when they are not a well-formed WebSocket request.
    pub async fn from_parts(
        parts: &mut http::request::Parts,
        relay: &Relay,
    ) -> Result<ClientUpgrade, ClientError> {
        if parts.version != http::Version::HTTP_2 {
            let upgrade = WebSocketUpgrade::from_request_parts(parts, relay)
                .await
                .map_err(|_| ClientError::NotWebSocket)?;
            let reads = Accepted::of(&parts.extensions).map(|on| on.reads().clone());
            return Ok(ClientUpgrade(Upgrade::Http1 { upgrade, reads }));
        }
        let websocket = parts.method == Method::CONNECT
            && parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
            && parts
                .headers
                .get(header::SEC_WEBSOCKET_VERSION)
                .is_some_and(|v| v == "13");
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        match on_upgrade {
            Some(on_upgrade) if websocket => Ok(ClientUpgrade(Upgrade::Http2 {
                on_upgrade,
                reads: ReadCharge::new(relay.memory()),
                sent: Accepted::of(&parts.extensions).map(|on| on.sent().clone()),
            })),
            _ => Err(ClientError::NotWebSocket),
        }
    }

    /// Accepts the WebSocket with `protocol` (the subprotocol chosen, if any): the
    /// handshake's answer. Once the client has it, `serve` runs with the socket, tracked
    /// by `tracker`, in `span`.
    pub fn accept<F, Fut>(
        self,
        limits: &Limits,
        protocol: Option<&str>,
        tracker: &TaskTracker,
        span: Span,
        serve: F,
    ) -> Response
    where
        F: FnOnce(ClientSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tracker = tracker.clone();
        match self.0 {
            Upgrade::Http1 { upgrade, reads } => {
                let mut upgrade = crate::websocket::configure(upgrade, limits);
                if let Some(protocol) = protocol {
                    upgrade = upgrade.protocols([protocol.to_owned()]);
                }
                upgrade
                    .on_upgrade(move |socket| {
                        tracker.track_future(
                            async move {
                                if let Some(reads) = &reads {
                                    reads.start();
                                }
                                serve(ClientSocket(Socket::Http1 { socket, reads })).await;
                            }
                            .instrument(span),
                        )
                    })
                    .into_response()
            }
            Upgrade::Http2 {
                on_upgrade,
                reads,
                sent,
            } => {
                let mut config = WebSocketConfig::default();
                config.read_buffer_size = WS_READ_BUFFER;
                config.write_buffer_size = WS_WRITE_BUFFER;
                config.max_message_size = Some(limits.max_frame_bytes);
                config.max_frame_size = Some(limits.max_frame_bytes);
                tracker.spawn(
                    async move {
                        let upgraded = match on_upgrade.await {
                            Ok(upgraded) => upgraded,
                            Err(err) => {
                                debug!(error = %err, "the client's WebSocket stream never opened");
                                return;
                            }
                        };
                        reads.start();
                        let io = ReadCharged::new(TokioIo::new(upgraded), &reads);
                        let socket =
                            WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                        serve(ClientSocket(Socket::Http2 {
                            socket,
                            reads,
                            sent,
                        }))
                        .await;
                    }
                    .instrument(span),
                );
                let mut response = StatusCode::OK.into_response();
                if let Some(protocol) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
                    response
                        .headers_mut()
                        .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
                }
                response
            }
        }
    }
}

/// A client's open WebSocket.
pub struct ClientSocket(Socket);

enum Socket {
    Http1 {
        socket: WebSocket,
        reads: Option<ReadCharge>,
    },
    Http2 {
        socket: WebSocketStream<ReadCharged<TokioIo<Upgraded>>>,
        reads: ReadCharge,
        sent: Option<SendDebt>,
    },
}

impl std::fmt::Debug for ClientSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Socket::Http1 { .. } => f.write_str("ClientSocket(HTTP/1.1)"),
            Socket::Http2 { .. } => f.write_str("ClientSocket(HTTP/2)"),
        }
    }
}

/// What a client's socket received.
#[derive(Debug)]
pub enum Received {
    /// A data message.
    Frame(Frame),
    /// A ping or pong (answered by the codec).
    Control,
    /// The client's Close, with its code and reason.
    Close(Option<(u16, String)>),
    /// The socket failed.
    Failed {
        /// The client broke the message size limit.
        too_big: bool,
    },
    /// The socket ended without a Close.
    Ended,
}

/// Why a send to the client failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailed {
    /// The client took nothing for the write timeout: it is not reading.
    TimedOut,
    /// The socket is gone.
    Gone,
}

impl ClientSocket {
    /// The next thing the client sent; what was read for a message is given back to the
    /// budget as it arrives.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Received {
        match &mut self.0 {
            Socket::Http1 { socket, reads } => {
                let message = socket.recv().await;
                if let (Some(reads), Some(Ok(message))) = (reads.as_ref(), &message) {
                    reads.message_done(crate::websocket::control_len(message));
                }
                match message {
                    Some(Ok(ws::Message::Text(text))) => {
                        Received::Frame(Frame::Text(text.to_string()))
                    }
                    Some(Ok(ws::Message::Binary(bytes))) => Received::Frame(Frame::Binary(bytes)),
                    Some(Ok(ws::Message::Ping(_) | ws::Message::Pong(_))) => Received::Control,
                    Some(Ok(ws::Message::Close(frame))) => {
                        Received::Close(frame.map(|f| (f.code, f.reason.to_string())))
                    }
                    Some(Err(err)) => Received::Failed {
                        too_big: crate::websocket::is_too_big(&err),
                    },
                    None => Received::Ended,
                }
            }
            Socket::Http2 { socket, reads, .. } => {
                let message = socket.next().await;
                if let Some(Ok(message)) = &message {
                    let control = match message {
                        Message::Ping(payload) | Message::Pong(payload) => Some(payload.len()),
                        _ => None,
                    };
                    reads.message_done(control);
                }
                match message {
                    Some(Ok(Message::Text(text))) => {
                        Received::Frame(Frame::Text(text.as_str().to_owned()))
                    }
                    Some(Ok(Message::Binary(bytes))) => Received::Frame(Frame::Binary(bytes)),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                        Received::Control
                    }
                    Some(Ok(Message::Close(frame))) => Received::Close(
                        frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())),
                    ),
                    Some(Err(err)) => Received::Failed {
                        too_big: crate::websocket::is_too_big(&err),
                    },
                    None => Received::Ended,
                }
            }
        }
    }

    /// Sends a data frame, waiting for the client to take it (its write timeout bounds
    /// the wait).
    ///
    /// # Errors
    /// See [`SendFailed`].
    pub async fn send(&mut self, frame: Frame) -> Result<(), SendFailed> {
        let failed = |err: &(dyn std::error::Error + 'static)| {
            if crate::connections::is_write_timeout(err) {
                SendFailed::TimedOut
            } else {
                SendFailed::Gone
            }
        };
        match &mut self.0 {
            Socket::Http1 { socket, .. } => {
                let message = match frame {
                    Frame::Text(text) => ws::Message::Text(text.into()),
                    Frame::Binary(bytes) => ws::Message::Binary(bytes),
                };
                socket.send(message).await.map_err(|err| failed(&err))
            }
            Socket::Http2 { socket, sent, .. } => {
                // Charged until the connection's socket takes it: the stream's send
                // buffer is hyper's, one per stream.
                if let Some(sent) = sent {
                    sent.debt().incur(frame.len()).await;
                }
                let message = match frame {
                    Frame::Text(text) => Message::Text(text.into()),
                    Frame::Binary(bytes) => Message::Binary(bytes),
                };
                socket.send(message).await.map_err(|err| failed(&err))
            }
        }
    }

    /// Pings the client; false when the socket is gone.
    pub async fn ping(&mut self) -> bool {
        match &mut self.0 {
            Socket::Http1 { socket, .. } => socket
                .send(ws::Message::Ping(bytes::Bytes::new()))
                .await
                .is_ok(),
            Socket::Http2 { socket, .. } => socket
                .send(Message::Ping(bytes::Bytes::new()))
                .await
                .is_ok(),
        }
    }

    /// Closes the socket with `code` and `reason` (no code when absent or not sendable
    /// on the wire), bounded by [`CLOSE_TIMEOUT`].
    pub async fn close(mut self, code: Option<u16>, reason: &str) {
        let code = code.filter(|c| close_code::is_sendable(*c));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            match &mut self.0 {
                Socket::Http1 { socket, .. } => {
                    let frame = code.map(|code| ws::CloseFrame {
                        code,
                        reason: reason.into(),
                    });
                    let _ = socket.send(ws::Message::Close(frame)).await;
                }
                Socket::Http2 { socket, .. } => {
                    let frame = code.map(|code| CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    });
                    let _ = socket.send(Message::Close(frame)).await;
                }
            }
        })
        .await;
    }

    /// Answers the client's Close (the codec queued the answer when it read it) and
    /// ends the socket, bounded by [`CLOSE_TIMEOUT`].
    pub async fn finish(self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            match self.0 {
                Socket::Http1 { mut socket, .. } => {
                    let _ = socket.close().await;
                }
                Socket::Http2 { mut socket, .. } => {
                    let _ = socket.close(None).await;
                }
            }
        })
        .await;
    }
}

/// A superset v2 host's dial-back socket is a WebSocket like a client's, charged alike.
#[async_trait::async_trait]
impl crate::tunnel::v2::DialSocket for ClientSocket {
    async fn recv(&mut self) -> crate::tunnel::v2::DialEvent {
        use crate::tunnel::v2::DialEvent;
        loop {
            return match ClientSocket::recv(self).await {
                Received::Frame(frame) => DialEvent::Frame(frame),
                Received::Control => continue,
                Received::Close(frame) => DialEvent::Closed(frame.map(|(code, _)| code)),
                Received::Failed { .. } | Received::Ended => DialEvent::Ended,
            };
        }
    }

    async fn send(&mut self, frame: Frame) -> Result<(), ()> {
        ClientSocket::send(self, frame).await.map_err(|_| ())
    }

    async fn close(self: Box<Self>, code: Option<u16>, reason: &str) {
        ClientSocket::close(*self, code, reason).await;
    }

    async fn finish(self: Box<Self>) {
        ClientSocket::finish(*self).await;
    }
}
