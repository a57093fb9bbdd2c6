//! Superset's dial-back tunnels ("v2", [`crate::protocol::v2`]): the tunnel is the host's
//! control channel, and every stream is a WebSocket the host dials back for it.
//!
//! - An exchange or a channel issues a [`Ticket`], sends `stream:dial` on the control
//!   channel and waits (at most `dial_timeout`) for the host's `GET /v2/dial` to bring
//!   the socket ([`Dials`]). A dial message that never left the queue hands the request
//!   back undelivered, to be routed again.
//! - A channel is then the dial socket itself, frames carried verbatim both ways; an
//!   exchange writes the request head, the body in chunks of at most
//!   [`crate::protocol::v2::BODY_CHUNK`] and `http:end`, and reads the answer the same
//!   way, the body streamed to the client as it comes.
//! - The control channel carries the host's pings (liveness, the directory heartbeat);
//!   one silent for `ping_interval` × `max_missed_pongs` is closed 4408.
//! - Its streams outlive a control channel closed by a drain or a replacement (they are
//!   sockets of their own; the host keeps them); a control channel that dies takes them
//!   with it (4410).

pub mod dials;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

pub use self::dials::{BoxedDial, DialEvent, DialSocket, Dials};
use crate::budget::TunnelBudget;
use crate::directory::Owner;
use crate::host_id::HostId;
use crate::limits::{CLOSE_TIMEOUT, Limits};
use crate::protocol::v2::{
    BODY_CHUNK, DialKind, HTTP_END, HttpRequestHead, Message as V2Message, PONG, StreamDial,
    Ticket, close,
};
use crate::protocol::{Frame, close_code};
use crate::tunnel::{
    ChannelEvent, ChannelRequest, ExchangeError, ExchangeFailure, Permit, SessionEnd, TunnelHandle,
};

/// A dial message waiting to be written: the ticket, so that one never written can be
/// withdrawn, and the message.
#[derive(Debug)]
struct Outgoing {
    ticket: String,
    message: String,
}

/// The relay's side of a v2 tunnel's streams.
#[derive(Debug)]
pub(crate) struct Link {
    control: mpsc::Sender<Outgoing>,
    dials: Arc<Dials>,
    issuer: Owner,
    host: HostId,
    budget: TunnelBudget,
    tracker: TaskTracker,
    dial_timeout: Duration,
    /// Cancelled when the tunnel is gone for good: its streams end with 4410.
    gone: CancellationToken,
}

/// Where a v2 tunnel lives: the relay's dial table and this machine (the tickets' issuer).
#[derive(Debug, Clone)]
pub struct Place {
    /// The relay's dials.
    pub dials: Arc<Dials>,
    /// This machine.
    pub issuer: Owner,
}

/// Why a dial brought no socket.
enum DialFailed {
    /// The dial message was never written: the host never heard of the stream.
    NotSent,
    /// The control channel's queue is full.
    Overloaded,
    /// The host did not dial back in time.
    Timeout,
    /// The tunnel went away after the dial was sent.
    Gone,
}

impl DialFailed {
    fn error(&self) -> ExchangeError {
        match self {
            DialFailed::NotSent | DialFailed::Gone => ExchangeError::TunnelClosed,
            DialFailed::Overloaded => ExchangeError::Overloaded,
            DialFailed::Timeout => ExchangeError::Timeout,
        }
    }
}

pub(crate) fn new(
    host: &HostId,
    socket: WebSocket,
    limits: &Limits,
    budget: TunnelBudget,
    tracker: &TaskTracker,
    place: &Place,
    shutdown: &CancellationToken,
) -> (Link, Parts) {
    let (tx, rx) = mpsc::channel(crate::limits::v2::CONTROL_QUEUE);
    let gone = CancellationToken::new();
    let link = Link {
        control: tx,
        dials: Arc::clone(&place.dials),
        issuer: place.issuer.clone(),
        host: host.clone(),
        budget,
        tracker: tracker.clone(),
        dial_timeout: limits.dial_timeout,
        gone: gone.clone(),
    };
    let parts = Parts {
        socket,
        rx,
        gone,
        dials: Arc::clone(&place.dials),
        shutdown: shutdown.clone(),
    };
    (link, parts)
}

/// What the session needs of a new v2 tunnel.
#[derive(Debug)]
pub(crate) struct Parts {
    socket: WebSocket,
    rx: mpsc::Receiver<Outgoing>,
    gone: CancellationToken,
    dials: Arc<Dials>,
    shutdown: CancellationToken,
}

impl Link {
    pub(crate) fn budget(&self) -> &TunnelBudget {
        &self.budget
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.control.is_closed()
    }

    /// Asks the host to dial back for one stream and waits for its socket.
    async fn dial(
        &self,
        kind: DialKind,
        path: &str,
        query: Option<&str>,
    ) -> Result<BoxedDial, DialFailed> {
        let ticket = Ticket::issue(&self.issuer);
        let expected = self.dials.expect(&ticket, &self.host);
        let message = StreamDial::new(expected.ticket(), kind, path, query).to_json();
        let outgoing = Outgoing {
            ticket: expected.ticket().to_owned(),
            message,
        };
        match self.control.try_send(outgoing) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(DialFailed::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(DialFailed::NotSent),
        }
        tokio::select! {
            socket = expected => socket.map_err(|_| DialFailed::NotSent),
            () = sleep(self.dial_timeout) => Err(DialFailed::Timeout),
            () = self.gone.cancelled() => Err(DialFailed::Gone),
        }
    }

    /// See [`TunnelHandle::exchange`]: one exchange over an `http` dial. The response
    /// head must come within `timeout`; the body is streamed, each frame within
    /// `timeout` of the last.
    pub(crate) async fn exchange(
        &self,
        permit: Permit,
        request: Request<Body>,
        timeout_after: Duration,
    ) -> Result<Response<Body>, ExchangeFailure> {
        let deadline = Instant::now() + timeout_after;
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut dial = match self.dial(DialKind::Http, &path, None).await {
            Ok(dial) => dial,
            Err(DialFailed::NotSent) => {
                return Err(ExchangeFailure::NotDelivered(Box::new(request)));
            }
            Err(failed) => return Err(failed.error().into()),
        };
        let (parts, body) = request.into_parts();
        let head = HttpRequestHead {
            kind_tag: "http:request".to_owned(),
            method: parts.method.as_str().to_owned(),
            path,
            headers: joined(&parts.headers),
        };
        let head = serde_json::to_string(&head).unwrap_or_default();
        if dial.send(Frame::Text(head)).await.is_err() {
            return Err(ExchangeError::TunnelClosed.into());
        }
        if let Err(err) = send_body(&mut *dial, body).await {
            dial.close(Some(close_code::NORMAL), "request body failed")
                .await;
            return Err(err.into());
        }
        if dial.send(Frame::Text(HTTP_END.to_owned())).await.is_err() {
            return Err(ExchangeError::TunnelClosed.into());
        }
        let head = tokio::select! {
            head = timeout(deadline.saturating_duration_since(Instant::now()), response_head(&mut *dial)) => head,
            () = self.gone.cancelled() => Ok(Err(ExchangeError::TunnelClosed)),
        };
        let head = match head {
            Ok(Ok(head)) => head,
            Ok(Err(err)) => {
                dial.close(Some(close::BAD_REQUEST), "invalid response")
                    .await;
                return Err(err.into());
            }
            Err(_) => {
                dial.close(Some(close_code::NORMAL), "response timed out")
                    .await;
                return Err(ExchangeError::Timeout.into());
            }
        };
        let (tx, rx) = mpsc::channel(1);
        self.tracker.spawn(stream_response_body(
            dial,
            tx,
            self.gone.clone(),
            timeout_after,
            permit,
        ));
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut response = Response::new(Body::from_stream(body));
        *response.status_mut() = head.0;
        *response.headers_mut() = head.1;
        crate::headers::from_host(response.headers_mut());
        Ok(response)
    }

    /// See [`TunnelHandle::open_channel`]: a `ws` dial; the channel is the host's socket.
    pub(crate) async fn open_channel(
        &self,
        tunnel: &TunnelHandle,
        request: ChannelRequest,
    ) -> Result<super::Opened, ExchangeError> {
        let dial = self
            .dial(DialKind::Ws, &request.path, request.query.as_deref())
            .await
            .map_err(|failed| failed.error())?;
        Ok(super::Opened::Channel {
            channel: super::Channel {
                tunnel: tunnel.clone(),
                inner: super::ChannelInner::V2(Channel {
                    dial: Some(dial),
                    gone: self.gone.clone(),
                    host_closed: false,
                }),
            },
            protocol: None,
        })
    }
}

/// Headers as one string per name, as superset's host reads them (`fetch`'s join: `, `;
/// cookies `; `).
fn joined(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        let separator = if name == http::header::COOKIE {
            "; "
        } else {
            ", "
        };
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(separator);
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    out
}

/// Writes the request body as binary frames of at most [`BODY_CHUNK`] bytes.
async fn send_body(dial: &mut dyn DialSocket, mut body: Body) -> Result<(), ExchangeError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            if crate::body::is_upload_too_slow(&err) {
                ExchangeError::BodyTooSlow
            } else {
                ExchangeError::BodyUnreadable
            }
        })?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(BODY_CHUNK));
            dial.send(Frame::Binary(chunk))
                .await
                .map_err(|()| ExchangeError::TunnelClosed)?;
        }
    }
    Ok(())
}

/// Reads the host's `http:response`.
async fn response_head(
    dial: &mut dyn DialSocket,
) -> Result<(StatusCode, HeaderMap), ExchangeError> {
    let invalid = |what: &str| ExchangeError::InvalidResponse(what.to_owned());
    loop {
        let text = match dial.recv().await {
            DialEvent::Frame(Frame::Text(text)) => text,
            DialEvent::Frame(Frame::Binary(_)) => {
                return Err(invalid("body before the http:response head"));
            }
            DialEvent::Closed(_) | DialEvent::Ended => return Err(ExchangeError::TunnelClosed),
        };
        match V2Message::parse(&text) {
            Ok(V2Message::HttpResponse(head)) => {
                let status = StatusCode::from_u16(head.status)
                    .map_err(|_| invalid("status out of range"))?;
                let mut headers = HeaderMap::new();
                for (name, value) in &head.headers {
                    match (
                        HeaderName::try_from(name.as_str()),
                        HeaderValue::try_from(value.as_str()),
                    ) {
                        (Ok(name), Ok(value)) => {
                            headers.append(name, value);
                        }
                        _ => debug!(header = %name, "v2 host sent an unusable header; dropped"),
                    }
                }
                return Ok((status, headers));
            }
            Ok(V2Message::HttpEnd) => return Err(invalid("http:end before the head")),
            Ok(V2Message::Ping | V2Message::Other) => {}
            Err(_) => return Err(invalid("a text frame that is not a JSON message")),
        }
    }
}

/// Carries the response body from the dial to the client, one frame at a time (the next
/// is read once the client took the last), until `http:end`; then closes the dial 1000.
/// A dial that ends first fails the body, so a cut answer never looks whole. Holds the
/// exchange's place (`permit`) until then.
async fn stream_response_body(
    mut dial: BoxedDial,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    gone: CancellationToken,
    idle: Duration,
    permit: Permit,
) {
    let _permit = permit;
    let failed = |why: &str| Err(std::io::Error::other(why.to_owned()));
    loop {
        let event = tokio::select! {
            event = timeout(idle, dial.recv()) => event,
            () = tx.closed() => {
                dial.close(Some(close_code::NORMAL), "client went away").await;
                return;
            }
            () = gone.cancelled() => {
                let _ = tx.send(failed("tunnel gone")).await;
                dial.close(Some(close::TUNNEL_GONE), "Tunnel disconnected").await;
                return;
            }
        };
        let Ok(event) = event else {
            let _ = tx.send(failed("host stopped sending the body")).await;
            dial.close(Some(close_code::NORMAL), "body timed out").await;
            return;
        };
        match event {
            DialEvent::Frame(Frame::Binary(bytes)) => {
                if tx.send(Ok(bytes)).await.is_err() {
                    dial.close(Some(close_code::NORMAL), "client went away")
                        .await;
                    return;
                }
            }
            DialEvent::Frame(Frame::Text(text)) => match V2Message::parse(&text) {
                Ok(V2Message::HttpEnd) => {
                    dial.close(Some(close_code::NORMAL), "Exchange complete")
                        .await;
                    return;
                }
                Ok(V2Message::Ping | V2Message::Other) => {}
                Ok(V2Message::HttpResponse(_)) | Err(_) => {
                    let _ = tx.send(failed("host sent an invalid frame")).await;
                    dial.close(Some(close::BAD_REQUEST), "invalid frame in the body")
                        .await;
                    return;
                }
            },
            DialEvent::Closed(_) => {
                let _ = tx.send(failed("host closed before the end")).await;
                dial.finish().await;
                return;
            }
            DialEvent::Ended => {
                let _ = tx.send(failed("host went away before the end")).await;
                return;
            }
        }
    }
}

/// One client WebSocket spliced to its dial socket.
pub(crate) struct Channel {
    /// `None` once closed.
    dial: Option<BoxedDial>,
    gone: CancellationToken,
    /// The host closed the dial: answering its Close is all that is left.
    host_closed: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("v2::Channel")
            .field("open", &self.dial.is_some())
            .finish()
    }
}

impl Channel {
    /// See [`super::Channel::recv`].
    pub(crate) async fn recv(&mut self) -> ChannelEvent {
        let Some(dial) = self.dial.as_mut() else {
            return ChannelEvent::Closed(Some(close_code::GOING_AWAY));
        };
        tokio::select! {
            biased;
            event = dial.recv() => match event {
                DialEvent::Frame(frame) => ChannelEvent::Frame(frame),
                DialEvent::Closed(code) => {
                    self.host_closed = true;
                    ChannelEvent::Closed(code)
                }
                DialEvent::Ended => {
                    self.host_closed = true;
                    ChannelEvent::Closed(Some(close_code::GOING_AWAY))
                }
            },
            () = self.gone.cancelled() => ChannelEvent::Closed(Some(close::TUNNEL_GONE)),
        }
    }

    /// See [`super::Channel::send`].
    pub(crate) async fn send(&mut self, frame: Frame) -> Result<(), ExchangeError> {
        let Some(dial) = self.dial.as_mut() else {
            return Err(ExchangeError::TunnelClosed);
        };
        tokio::select! {
            sent = dial.send(frame) => sent.map_err(|()| ExchangeError::TunnelClosed),
            () = self.gone.cancelled() => Err(ExchangeError::TunnelClosed),
        }
    }

    /// See [`super::Channel::close`]: the client's code goes to the host as it is (a
    /// code that may not be sent on the wire, none).
    pub(crate) async fn close(&mut self, code: Option<u16>) {
        let Some(dial) = self.dial.take() else {
            return;
        };
        if self.host_closed {
            dial.finish().await;
            return;
        }
        let (code, reason) = if self.gone.is_cancelled() {
            (Some(close::TUNNEL_GONE), "Tunnel disconnected")
        } else {
            (code.filter(|c| close_code::is_sendable(*c)), "")
        };
        dial.close(code, reason).await;
    }
}

/// The actor of one v2 tunnel: its control channel.
pub struct Session {
    handle: TunnelHandle,
    parts: Parts,
    limits: Limits,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("v2::Session")
            .field("tunnel", &self.handle.id())
            .finish()
    }
}

impl Session {
    pub(crate) fn new(handle: TunnelHandle, parts: Parts, limits: Limits) -> Session {
        Session {
            handle,
            parts,
            limits,
        }
    }

    /// Runs the control channel until the host goes, goes silent, or a handle closes it;
    /// then closes it with the code superset's host acts on. A tunnel closed by a drain
    /// or a replacement lets its streams run on (until they end, or the relay shuts
    /// down) before it ends; any other end takes them with it (4410).
    pub(crate) async fn run(self, on_pong: impl Fn() + Send) -> SessionEnd {
        let Session {
            handle,
            parts,
            limits,
        } = self;
        let Parts {
            socket,
            mut rx,
            gone,
            dials,
            shutdown,
        } = parts;
        let (mut sink, mut stream) = socket.split();
        let stale_after = limits.ping_interval * limits.max_missed_pongs;
        let check_every = (stale_after / 4).max(Duration::from_millis(50));
        let mut check = interval_at(Instant::now() + check_every, check_every);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let cancel = handle.cancel_token().clone();
        let end = loop {
            tokio::select! {
                () = cancel.cancelled() => break handle.closed_with(),
                outgoing = rx.recv() => {
                    let Some(outgoing) = outgoing else { break handle.closed_with() };
                    if sink.send(Message::Text(outgoing.message.into())).await.is_err() {
                        dials.forget(&outgoing.ticket);
                        break SessionEnd::HostGone("control channel write failed".into());
                    }
                }
                message = stream.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        heard = Instant::now();
                        match V2Message::parse(&text) {
                            Ok(V2Message::Ping) => {
                                handle.record_pong();
                                on_pong();
                                if sink.send(Message::Text(PONG.into())).await.is_err() {
                                    break SessionEnd::HostGone("control channel write failed".into());
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break SessionEnd::BadMessage("control messages are JSON with a type"),
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        break SessionEnd::BadMessage("control messages are text");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => heard = Instant::now(),
                    Some(Ok(Message::Close(frame))) => {
                        break SessionEnd::HostClosed(frame.map(|f| f.code));
                    }
                    Some(Err(err)) => {
                        break if crate::websocket::is_too_big(&err) {
                            SessionEnd::TooBig
                        } else {
                            SessionEnd::HostGone(err.to_string())
                        };
                    }
                    None => break SessionEnd::HostGone("control channel ended".into()),
                },
                _ = check.tick() => {
                    if heard.elapsed() >= stale_after {
                        break SessionEnd::PingTimeout;
                    }
                }
            }
        };
        // No more dials: those queued but never written fail now (their requests are
        // routed again).
        handle.cancel_token().cancel();
        rx.close();
        while let Ok(outgoing) = rx.try_recv() {
            dials.forget(&outgoing.ticket);
        }
        if let Some((code, reason)) = close_frame(&end) {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = timeout(CLOSE_TIMEOUT, async {
                sink.send(Message::Close(Some(frame))).await?;
                while let Some(message) = stream.next().await {
                    if matches!(message?, Message::Close(_)) {
                        break;
                    }
                }
                Ok::<_, axum::Error>(())
            })
            .await;
        }
        drop((sink, stream));
        let streams_run_on = matches!(
            end,
            SessionEnd::Closed(close_code::DRAINING | close_code::REPLACED)
        );
        if streams_run_on {
            tokio::select! {
                () = handle.idle() => {}
                () = shutdown.cancelled() => {}
            }
        }
        gone.cancel();
        end
    }
}

/// The Close the relay sends on a v2 control channel, in superset's codes.
fn close_frame(end: &SessionEnd) -> Option<(u16, &'static str)> {
    Some(match end {
        SessionEnd::HostClosed(_) | SessionEnd::HostGone(_) => return None,
        SessionEnd::PingTimeout => (close::STALE_HOST, "No keepalive from host"),
        SessionEnd::TooBig => (close_code::TOO_BIG, "message over the control limit"),
        SessionEnd::BadMessage(why) => (close::BAD_REQUEST, why),
        SessionEnd::Closed(close_code::REPLACED) => (close::REPLACED, "Replaced by new tunnel"),
        SessionEnd::Closed(code) => (*code, super::close_reason(*code)),
    })
}
