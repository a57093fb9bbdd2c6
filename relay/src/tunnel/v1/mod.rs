//! A v1 tunnel: every exchange is one JSON message each way, bodies buffered whole
//! (text as-is, binary as base64), channels carried frame by frame.
//!
//! Here the relay's `http` types meet v1: a request body is read whole (up to the body
//! limit) and must be UTF-8, since the contract carries it as a string; the host's answer
//! becomes an `http::Response` with its body in one piece. The socket is owned by the
//! [`Session`] task; its `Link` reaches it through a bounded command queue.

mod session;
mod streams;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use tokio::sync::{mpsc, oneshot};

use super::{
    ChannelEvent, ChannelInner, ChannelRequest, ExchangeError, ExchangeFailure, Opened, Permit,
    TunnelHandle,
};
use crate::body::Guarded;
use crate::budget::{Charge, TunnelBudget};
use crate::headers;
use crate::limits::Limits;
use crate::protocol::v1::Headers;
use crate::protocol::{Frame, StreamId, close_code};
use crate::telemetry;

pub use session::Session;

/// A request for the host, as v1 carries it: the head, and the whole body, which is text.
#[derive(Debug)]
pub(crate) struct HttpRequest {
    parts: http::request::Parts,
    body: String,
    /// The body's bytes, and its message's while it is written, against the budgets.
    charge: Charge,
}

impl HttpRequest {
    /// The request again, for a caller that routes it elsewhere (the host never saw it).
    fn into_request(self) -> Request<Body> {
        Request::from_parts(self.parts, Body::from(Bytes::from(self.body)))
    }
}

/// The host's answer to an [`HttpRequest`].
#[derive(Debug)]
pub(crate) struct HttpResponse {
    /// HTTP status as the host sent it (validated by [`into_response`]).
    pub(crate) status: u16,
    /// Response headers as the host sent them.
    pub(crate) headers: Headers,
    /// Response body.
    pub(crate) body: Vec<u8>,
}

/// How an exchange ended without an answer, as the session reports it.
#[derive(Debug)]
pub(crate) enum Failure {
    Failed(ExchangeError),
    /// Never written to the tunnel.
    NotDelivered(Box<HttpRequest>),
}

impl From<ExchangeError> for Failure {
    fn from(err: ExchangeError) -> Failure {
        Failure::Failed(err)
    }
}

/// Something a handle asks the session to do. Processed in order.
#[derive(Debug)]
pub(crate) enum Command {
    /// Start an HTTP exchange. Boxed: the queue's blocks are sized by the largest
    /// command, and an idle tunnel's first block would otherwise be ten times larger.
    Http {
        id: StreamId,
        request: Box<HttpRequest>,
        respond: oneshot::Sender<Result<HttpResponse, Failure>>,
    },
    /// The client of an exchange gave up (timeout or disconnect): forget the stream.
    Abandon { id: StreamId },
    /// Open a WebSocket channel.
    OpenChannel {
        id: StreamId,
        path: String,
        query: Option<String>,
        to_client: ChannelSender,
    },
    /// A frame from the client of a channel, charged until it is written.
    ChannelFrame {
        id: StreamId,
        frame: Frame,
        charge: Charge,
    },
    /// The client side of a channel closed (or must be closed with this code).
    CloseChannel { id: StreamId, code: Option<u16> },
    /// The relay closed a channel on its own (slow client): tell the host. The stream is
    /// already gone from the table.
    NotifyClosed { id: StreamId, code: u16 },
    /// Tell the host to reconnect elsewhere (in-band `drain`).
    Drain { reason: String },
    /// Send a ping now (besides the periodic ones).
    Ping,
}

/// The session's side of a channel: where host frames for the client go.
#[derive(Debug)]
pub(crate) struct ChannelSender {
    frames: mpsc::Sender<Queued>,
    closed: oneshot::Sender<Option<u16>>,
    /// Bytes queued in `frames` (see [`Frame::queued_cost`]), shared with the receiving side.
    queued: Arc<AtomicUsize>,
    /// Most bytes that may be queued ([`crate::limits::CHANNEL_QUEUE_BYTES`]).
    queue_bytes: usize,
    /// The tunnel's budgets, which queued frames are charged against too.
    budget: TunnelBudget,
}

/// A host frame waiting for its client, charged against the budgets until taken.
#[derive(Debug)]
pub(super) struct Queued {
    frame: Frame,
    _charge: Charge,
}

/// An upper bound on the size of the `http` message that carries a request: the body as
/// JSON escapes it (quotes and backslashes take 2 bytes, control characters 2 or 6), plus
/// the path, query and headers at worst-case escaping, plus the fields' names.
fn encoded_len(parts: &http::request::Parts, body: &str) -> usize {
    const ENVELOPE: usize = 256;
    let body = json_escaped_len(body);
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) * 6;
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len()) * 6 + 8)
        .sum();
    ENVELOPE + body + target + headers
}

/// The length of `text` as a JSON string (quotes included), escaped as serde_json does.
fn json_escaped_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The handle's side of a v1 tunnel.
#[derive(Debug)]
pub(crate) struct Link {
    tx: mpsc::Sender<Command>,
    next_stream: AtomicU64,
    max_body_bytes: usize,
    /// Largest message the host takes ([`Limits::max_frame_bytes`]).
    max_message: usize,
    channel_queue: usize,
    channel_queue_bytes: usize,
    /// What this tunnel's buffers are charged against ([`crate::budget`]).
    budget: TunnelBudget,
}

impl Link {
    pub(crate) fn budget(&self) -> &TunnelBudget {
        &self.budget
    }

    pub(crate) fn new(limits: &Limits, budget: TunnelBudget) -> (Link, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(limits.tunnel_queue);
        let link = Link {
            tx,
            next_stream: AtomicU64::new(1),
            max_body_bytes: limits.max_body_bytes,
            max_message: limits.max_frame_bytes,
            channel_queue: limits.channel_queue,
            channel_queue_bytes: limits.channel_queue_bytes,
            budget,
        };
        (link, rx)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn drain(&self, reason: &str) -> bool {
        self.tx
            .try_send(Command::Drain {
                reason: reason.to_owned(),
            })
            .is_ok()
    }

    pub(crate) fn ping_now(&self) {
        let _ = self.tx.try_send(Command::Ping);
    }

    fn next_stream_id(&self) -> StreamId {
        StreamId(self.next_stream.fetch_add(1, Ordering::Relaxed))
    }

    async fn send(&self, command: Command) -> Result<(), ExchangeError> {
        self.tx
            .send(command)
            .await
            .map_err(|_| ExchangeError::TunnelClosed)
    }

    /// See [`TunnelHandle::exchange`]: the body is read whole first (v1 has no other
    /// way), and `timeout` bounds the wait for the whole answer, queueing included.
    ///
    /// The body is read holding no place of the tunnel's (`permit` is given back, and
    /// one taken again once the body is in): clients uploading slowly cannot take every
    /// place of a host they have not even reached yet. What is read is charged against
    /// the byte budgets, and so is the answer, until its client has it.
    pub(crate) async fn exchange(
        &self,
        tunnel: &TunnelHandle,
        permit: Permit,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Body>, ExchangeFailure> {
        drop(permit);
        let (mut parts, body) = request.into_parts();
        // v1 carries no trailers: asking for them means nothing to a v1 host.
        parts.headers.remove(header::TE);
        let (body, mut charge) =
            read_body(&parts.headers, body, self.max_body_bytes, &self.budget).await?;
        let body = String::from_utf8(body.into()).map_err(|_| ExchangeError::BodyNotText)?;
        if encoded_len(&parts, &body) > self.max_message {
            return Err(ExchangeError::BodyTooLargeEncoded {
                limit: self.max_message,
            }
            .into());
        }
        // The message the session writes is a second copy of the body, for a moment.
        charge.merge(
            self.budget
                .try_charge(json_escaped_len(&body))
                .map_err(ExchangeError::OverBudget)?,
        );
        let _permit = tunnel.reserve()?;
        telemetry::bytes("to_host", body.len());
        let id = self.next_stream_id();
        let (respond, response) = oneshot::channel();
        let mut guard = AbandonOnDrop {
            link: self,
            id,
            armed: true,
        };
        let command = Command::Http {
            id,
            request: Box::new(HttpRequest {
                parts,
                body,
                charge,
            }),
            respond,
        };
        let result = tokio::time::timeout(timeout, async {
            if let Err(mpsc::error::SendError(command)) = self.tx.send(command).await {
                // The session is gone: the request never entered the tunnel.
                return match command {
                    Command::Http { request, .. } => Err(Failure::NotDelivered(request)),
                    _ => Err(ExchangeError::TunnelClosed.into()),
                };
            }
            response
                .await
                .unwrap_or(Err(ExchangeError::TunnelClosed.into()))
        })
        .await
        .unwrap_or(Err(ExchangeError::Timeout.into()));
        // The session removes the stream itself when the host answers or the tunnel
        // ends; only a timeout leaves it behind.
        guard.armed = matches!(result, Err(Failure::Failed(ExchangeError::Timeout)));
        drop(guard);
        match result {
            Ok(response) => {
                telemetry::bytes("from_host", response.body.len());
                // Read already, but kept only if there is room until the client has it.
                let charge = self
                    .budget
                    .try_charge(response.body.len())
                    .map_err(ExchangeError::OverBudget)?;
                into_response(response, charge).map_err(ExchangeFailure::Failed)
            }
            Err(Failure::Failed(err)) => Err(ExchangeFailure::Failed(err)),
            Err(Failure::NotDelivered(request)) => Err(ExchangeFailure::NotDelivered(Box::new(
                request.into_request(),
            ))),
        }
    }

    /// See [`TunnelHandle::open_channel`]: v1 sends `ws:open` and has no answer to wait
    /// for, and cannot carry subprotocols.
    pub(crate) async fn open_channel(
        &self,
        tunnel: &TunnelHandle,
        request: ChannelRequest,
    ) -> Result<Opened, ExchangeError> {
        let id = self.next_stream_id();
        let (frames_tx, frames) = mpsc::channel(self.channel_queue);
        let (closed_tx, closed) = oneshot::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.send(Command::OpenChannel {
            id,
            path: request.path,
            query: request.query,
            to_client: ChannelSender {
                frames: frames_tx,
                closed: closed_tx,
                queued: Arc::clone(&queued),
                queue_bytes: self.channel_queue_bytes,
                budget: self.budget.clone(),
            },
        })
        .await?;
        Ok(Opened::Channel {
            channel: super::Channel {
                tunnel: tunnel.clone(),
                inner: ChannelInner::V1(Channel {
                    id,
                    tunnel: tunnel.clone(),
                    frames,
                    queued,
                    closed,
                    host_closed: None,
                    closed_sent: false,
                }),
            },
            protocol: None,
        })
    }
}

/// Tells the session to forget an exchange whose client stopped waiting.
struct AbandonOnDrop<'a> {
    link: &'a Link,
    id: StreamId,
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: if the queue is full, the session's periodic prune of streams
            // whose client is gone catches it.
            let _ = self.link.tx.try_send(Command::Abandon { id: self.id });
        }
    }
}

/// Reads a request body whole, refusing it (413) past `limit` before reading further,
/// and charging it to `budget` as it arrives (503 when there is no room).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    budget: &TunnelBudget,
) -> Result<(Bytes, Charge), ExchangeError> {
    use http_body_util::BodyExt as _;
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|length| length > limit as u64) {
        return Err(ExchangeError::BodyTooLarge { limit });
    }
    // A body of known length is charged whole before a byte of it is read: one that
    // does not fit is refused at once, instead of being read in part and dropped.
    let mut charge = match length {
        Some(length) => budget
            .try_charge(length as usize)
            .map_err(ExchangeError::OverBudget)?,
        None => Charge::default(),
    };
    let prepaid = charge.bytes();
    let mut whole = bytes::BytesMut::with_capacity(prepaid);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            if crate::body::is_upload_too_slow(&err) {
                ExchangeError::BodyTooSlow
            } else {
                ExchangeError::BodyUnreadable
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if whole.len() + data.len() > limit {
            return Err(ExchangeError::BodyTooLarge { limit });
        }
        // Past what was paid up front (all of it, for a body of known length).
        let unpaid = (whole.len() + data.len()).saturating_sub(prepaid.max(whole.len()));
        charge.merge(
            budget
                .try_charge(unpaid)
                .map_err(ExchangeError::OverBudget)?,
        );
        whole.extend_from_slice(&data);
    }
    Ok((whole.freeze(), charge))
}

/// The client's response from the host's v1 answer: a final status (1xx cannot be
/// carried), headers HTTP can carry, and the whole body (framed by the relay, so the
/// host's `content-length` is dropped).
fn into_response(response: HttpResponse, charge: Charge) -> Result<Response<Body>, ExchangeError> {
    let status = StatusCode::from_u16(response.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            ExchangeError::InvalidResponse(format!(
                "status {} is not a final HTTP status",
                response.status
            ))
        })?;
    let (mut map, skipped) = response.headers.to_map();
    for _ in 0..skipped {
        telemetry::message_ignored("bad_header");
    }
    map.remove(header::CONTENT_LENGTH);
    headers::from_host(&mut map);
    // 204 and 304 have no content (RFC 9110 §6.4.1): a body the host sent anyway is
    // dropped, so no Content-Length goes out with them.
    let body = if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        Body::empty()
    } else {
        // The charge is given back once the body is sent (or the client goes).
        Body::new(Guarded::new(Body::from(response.body), charge))
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = map;
    Ok(out)
}

/// The client side of one v1 channel.
#[derive(Debug)]
pub(crate) struct Channel {
    id: StreamId,
    tunnel: TunnelHandle,
    /// Frames from the host, in order. Ends when the channel or tunnel ends.
    frames: mpsc::Receiver<Queued>,
    /// Bytes queued in `frames`, given back as they are taken.
    queued: Arc<AtomicUsize>,
    /// Resolves with the host's close code; errors when the tunnel went without a word.
    closed: oneshot::Receiver<Option<u16>>,
    /// The host's close, once seen: frames sent before it are delivered first.
    host_closed: Option<Option<u16>>,
    /// Whether the host was told the client closed (or needs no telling).
    closed_sent: bool,
}

impl Channel {
    /// Gives a frame's share of the byte budgets back as it leaves the queue.
    fn taken(&self, queued: Queued) -> Frame {
        self.queued
            .fetch_sub(queued.frame.queued_cost(), Ordering::Relaxed);
        queued.frame
    }

    fn link(&self) -> &Link {
        match self.tunnel.link() {
            super::Link::V1(link) => link,
            super::Link::H2(_) | super::Link::V2(_) => {
                unreachable!("a v1 channel lives on a v1 tunnel")
            }
        }
    }

    /// See [`super::Channel::recv`].
    pub(crate) async fn recv(&mut self) -> ChannelEvent {
        if let Some(code) = self.host_closed {
            self.closed_sent = true;
            return match self.frames.try_recv() {
                Ok(frame) => ChannelEvent::Frame(self.taken(frame)),
                Err(_) => ChannelEvent::Closed(code),
            };
        }
        tokio::select! {
            // Host frames first: everything the host sent before its close is delivered
            // before the close.
            biased;
            frame = self.frames.recv() => match frame {
                Some(frame) => ChannelEvent::Frame(self.taken(frame)),
                // Closed by the host, overflowed, or the tunnel went.
                None => {
                    self.closed_sent = true;
                    let code = self.closed.try_recv().unwrap_or(Some(close_code::GOING_AWAY));
                    self.host_closed = Some(code);
                    ChannelEvent::Closed(code)
                }
            },
            code = &mut self.closed => {
                let code = code.unwrap_or(Some(close_code::GOING_AWAY));
                self.host_closed = Some(code);
                self.closed_sent = true;
                match self.frames.try_recv() {
                    Ok(queued) => ChannelEvent::Frame(self.taken(queued)),
                    Err(_) => ChannelEvent::Closed(code),
                }
            }
        }
    }

    /// See [`super::Channel::send`].
    pub(crate) async fn send(&mut self, frame: Frame) -> Result<(), ExchangeError> {
        let id = self.id;
        let link = self.link();
        // Waits while the tunnel's buffers are full: a client writing faster than its
        // host reads is slowed down (its socket is not read meanwhile).
        let charge = link.budget.charge(frame.queued_cost()).await;
        link.send(Command::ChannelFrame { id, frame, charge }).await
    }

    /// See [`super::Channel::close`].
    pub(crate) async fn close(&mut self, code: Option<u16>) {
        if self.closed_sent {
            return;
        }
        self.closed_sent = true;
        let id = self.id;
        let _ = self.link().send(Command::CloseChannel { id, code }).await;
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if !self.closed_sent {
            // The client went without a close (or never completed its upgrade): the host
            // must not keep its local socket open. Best effort; the session also prunes
            // channels whose client is gone.
            let id = self.id;
            let _ = self.link().tx.try_send(Command::CloseChannel {
                id,
                code: Some(close_code::GOING_AWAY),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use axum::extract::ws::Message;
    use futures_util::{Sink, Stream};
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::host_id::HostId;
    use crate::tunnel::SessionEnd;

    /// A socket whose host has gone: reads end at once, writes are accepted and dropped.
    struct GoneSocket;

    impl Stream for GoneSocket {
        type Item = Result<Message, axum::Error>;
        fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(None)
        }
    }

    impl Sink<Message> for GoneSocket {
        type Error = axum::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, _: Message) -> Result<(), Self::Error> {
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    fn tunnel() -> (TunnelHandle, Session) {
        let host = HostId::parse("web-1").unwrap();
        TunnelHandle::new_v1(
            host,
            &Limits::default(),
            crate::budget::TunnelBudget::alone(usize::MAX, &crate::budget::Budget::new(usize::MAX)),
            &CancellationToken::new(),
        )
    }

    fn request(path: &str) -> Request<Body> {
        Request::builder()
            .method("POST")
            .uri(path)
            .body(Body::from("payload"))
            .unwrap()
    }

    /// The path and body of a request handed back.
    async fn unpack(request: Request<Body>) -> (String, Bytes) {
        let path = request.uri().path().to_owned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        (path, body)
    }

    #[tokio::test]
    async fn request_comes_back_undelivered_when_the_session_is_already_gone() {
        let (handle, session) = tunnel();
        drop(session);
        let permit = handle.reserve().unwrap();
        let failure = handle
            .exchange(permit, request("/orders"), Duration::from_secs(5))
            .await
            .unwrap_err();
        let ExchangeFailure::NotDelivered(back) = failure else {
            panic!("expected the request back, got {failure:?}");
        };
        let (path, body) = unpack(*back).await;
        assert_eq!((path.as_str(), &body[..]), ("/orders", &b"payload"[..]));
        assert_eq!(handle.pending_exchanges(), 0, "the permit is released");
    }

    #[tokio::test]
    async fn request_queued_when_the_tunnel_is_closed_comes_back_undelivered() {
        let (handle, session) = tunnel();
        let exchange = tokio::spawn({
            let handle = handle.clone();
            async move {
                let permit = handle.reserve().unwrap();
                handle
                    .exchange(permit, request("/queued"), Duration::from_secs(5))
                    .await
            }
        });
        // The session is not running yet: the request waits in the tunnel's queue.
        let super::super::Link::V1(link) = handle.link() else {
            unreachable!("a v1 tunnel");
        };
        let max = link.tx.max_capacity();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while link.tx.capacity() == max {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the request was never queued"
            );
            tokio::task::yield_now().await;
        }
        handle.close(close_code::REPLACED);
        // The session sees the close or the end of the socket first (the order is not
        // fixed); either way its writer takes nothing more from the queue.
        let end = session.run(GoneSocket, || {}).await;
        assert!(
            matches!(
                end,
                SessionEnd::Closed(close_code::REPLACED) | SessionEnd::HostGone(_)
            ),
            "{end:?}"
        );
        match exchange.await.unwrap() {
            Err(ExchangeFailure::NotDelivered(back)) => {
                assert_eq!(unpack(*back).await.0, "/queued");
            }
            other => panic!("expected the request back, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_undelivered_request_reports_as_tunnel_closed_when_not_routed_again() {
        let (handle, session) = tunnel();
        drop(session);
        let permit = handle.reserve().unwrap();
        let err = handle
            .exchange(permit, request("/x"), Duration::from_secs(5))
            .await
            .unwrap_err()
            .into_error();
        assert_eq!(err, ExchangeError::TunnelClosed);
    }

    #[tokio::test]
    async fn a_binary_body_is_refused_before_reaching_the_queue() {
        let (handle, _session) = tunnel();
        let permit = handle.reserve().unwrap();
        let request = Request::builder()
            .method("POST")
            .uri("/bin")
            .body(Body::from(vec![0xff, 0xfe]))
            .unwrap();
        let err = handle
            .exchange(permit, request, Duration::from_secs(5))
            .await
            .unwrap_err()
            .into_error();
        assert_eq!(err, ExchangeError::BodyNotText);
    }

    #[test]
    fn a_host_answer_with_an_informational_status_is_refused() {
        let response = HttpResponse {
            status: 101,
            headers: Headers::default(),
            body: Vec::new(),
        };
        assert!(matches!(
            into_response(response, Charge::default()),
            Err(ExchangeError::InvalidResponse(_))
        ));
    }

    #[test]
    fn the_escaped_length_is_what_serde_json_writes() {
        for text in [
            "",
            "plain ascii",
            "quote \" and backslash \\",
            "\n\r\t\u{8}\u{c}",
            "\u{0}\u{1}\u{1f}\u{7f}",
            "héllo wörld ✓ 🚀",
        ] {
            assert_eq!(
                json_escaped_len(text),
                serde_json::to_string(text).unwrap().len(),
                "{text:?}"
            );
        }
    }
}
