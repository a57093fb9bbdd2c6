//! A v1 tunnel, the agent's side: JSON messages both ways, bodies whole.
//!
//! One task owns the socket. Inside it a reader and a writer future are `select!`-ed
//! (with the tunnel's cancellation): the writer drains a bounded queue of ready JSON
//! texts, the reader dispatches each relay message and never waits on anything but the
//! socket and its timers. Exchanges and channels run as their own tasks (bounded: at most
//! [`MAX_IN_FLIGHT`] exchanges and [`MAX_CHANNELS`] channels) and queue their answers.
//!
//! A drained v1 tunnel closes its side (1000) once its in-flight exchanges and channels
//! are done *and* a newer tunnel of this agent is registered, or when the relay closes it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::{Request, Response, header};
use http_body_util::{BodyExt, Limited};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::config::RelayUrl;
use super::tunnel::{Alarm, EndCause, InFlight, Shared, Socket, TunnelEnd, Watchdogs};
use super::upstream::{Answered, Failure, Upstream};
use crate::budget::{Budget, Held};
use crate::headers;
use crate::limits::agent::{
    CHANNEL_QUEUE, CHANNEL_QUEUE_BYTES, CLOSE_GRACE, MAX_CHANNEL_MESSAGE, MAX_CHANNELS,
    MAX_IN_FLIGHT, MAX_RESPONSE_BYTES, MAX_TUNNEL_MESSAGE, TUNNEL_QUEUE, UPSTREAM_CONNECT_TIMEOUT,
    UPSTREAM_TIMEOUT,
};
use crate::protocol::v1::{Decoded, Headers, HostMessage, Payload, RelayMessage};
use crate::protocol::{Frame, close_code};

/// Messages written to the socket before one flush: batching small messages matters under
/// load, and the cap keeps one burst from delaying a pong for long.
const MAX_BATCH: usize = 64;

/// Serves an open v1 tunnel until it ends.
pub(super) async fn serve(
    shared: Arc<Shared>,
    relay: RelayUrl,
    watchdogs: Watchdogs,
    socket: Socket,
    cancel: CancellationToken,
) -> TunnelEnd {
    Session::new(shared, relay, watchdogs)
        .serve(socket, cancel)
        .await
}

/// The tunnel's side of one channel.
struct ChannelHandle {
    /// Client frames and close, in order; dropping it tells the channel the tunnel is gone.
    tx: mpsc::Sender<ChannelCommand>,
    /// Bytes of frames in `tx` ([`Frame::queued_cost`]), shared with the channel's task.
    queued: Arc<AtomicUsize>,
    /// Ends the channel out of band, with a code (its queue overflowed).
    kill: Option<oneshot::Sender<u16>>,
}

impl ChannelHandle {
    fn kill(&mut self, code: u16) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(code);
        }
    }
}

/// A message for the tunnel's writer, with what it holds of the tunnel's answer budget
/// ([`ANSWER_BUDGET`](crate::limits::agent::ANSWER_BUDGET)) until it is written.
struct Outbound {
    text: String,
    _held: Held,
}

impl Outbound {
    /// A message that holds nothing (the session's own: pongs, refusals, closes).
    fn free(text: String) -> Outbound {
        Outbound {
            text,
            _held: Held::default(),
        }
    }
}

/// The reader's state of one open tunnel. Owned by the tunnel's task; nothing here is
/// shared, so nothing is locked.
struct Session {
    shared: Arc<Shared>,
    relay: RelayUrl,
    watchdogs: Watchdogs,
    /// The writer's queue. The session keeps one sender, so the writer never sees it end.
    out_tx: mpsc::Sender<Outbound>,
    out_rx: Option<mpsc::Receiver<Outbound>>,
    /// What answers and local frames may hold until written.
    answers: Budget,
    /// Exchanges in flight (bounded, like the relay's pending limit).
    exchanges: Arc<Semaphore>,
    /// Open channels by id. Bounded by [`MAX_CHANNELS`]; entries whose task ended are
    /// pruned on every ping and whenever the map is full.
    channels: HashMap<String, ChannelHandle>,
    /// Exchanges plus channels still running.
    in_flight: Arc<watch::Sender<usize>>,
    /// Cancelled when the tunnel ends: its exchanges and channels stop.
    work_cancel: CancellationToken,
}

// === impl Session ===

impl Session {
    fn new(shared: Arc<Shared>, relay: RelayUrl, mut watchdogs: Watchdogs) -> Session {
        let (out_tx, out_rx) = mpsc::channel(TUNNEL_QUEUE);
        let answers = Budget::new(shared.answer_budget);
        let in_flight = Arc::new(watch::Sender::new(0));
        watchdogs.wait_for(in_flight.subscribe());
        Session {
            shared,
            relay,
            watchdogs,
            out_tx,
            out_rx: Some(out_rx),
            answers,
            exchanges: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            channels: HashMap::new(),
            in_flight,
            work_cancel: CancellationToken::new(),
        }
    }

    /// Serves the open `socket` until it ends; then stops this tunnel's work and closes
    /// the socket within [`CLOSE_GRACE`].
    async fn serve<S>(mut self, socket: S, cancel: CancellationToken) -> TunnelEnd
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Unpin,
    {
        let (mut sink, mut stream) = socket.split();
        let mut out_rx = self.out_rx.take().expect("a session is served once");
        // The reader asks the writer to finish a drained tunnel: the writer writes what is
        // queued (the last answers) before ending, so nothing is dropped mid-write.
        let finish = Notify::new();
        let cause = tokio::select! {
            cause = write_loop(&mut sink, &mut out_rx, &finish) => cause,
            cause = self.read_loop(&mut stream, &finish) => cause,
            () = cancel.cancelled() => EndCause::Shutdown,
        };
        let registered_for = self.watchdogs.registered_for();
        // Local channels close (1001) while the tunnel closes.
        self.work_cancel.cancel();
        self.channels.clear();
        match &cause {
            EndCause::Drained | EndCause::Shutdown => {
                let reason = if cause == EndCause::Drained {
                    "drained"
                } else {
                    "agent shutting down"
                };
                close_gracefully(&mut sink, &mut stream, &mut out_rx, reason).await;
            }
            // The socket queued its answer to the relay's Close: flush it, bounded.
            EndCause::RelayClosed { .. } => {
                let _ = timeout(CLOSE_GRACE, sink.close()).await;
            }
            // A dead or broken socket: nothing to say on it; drop it.
            EndCause::Silence(_) | EndCause::Transport(_) => {}
        }
        debug!(relay = %self.relay, %cause, "tunnel closed");
        TunnelEnd::Ended {
            registered_for,
            cause,
        }
    }

    /// Reads relay messages until the socket ends or goes silent. A drained tunnel that
    /// is done asks the writer (`finish`) to end it, and keeps reading meanwhile.
    async fn read_loop<R>(&mut self, stream: &mut R, finish: &Notify) -> EndCause
    where
        R: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        self.watchdogs.heard(true);
                        self.on_text(text.as_str());
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame
                            .map(|f| (Some(u16::from(f.code)), f.reason.as_str().to_owned()))
                            .unwrap_or_default();
                        return EndCause::RelayClosed { code, reason };
                    }
                    // v1 is text only; WebSocket pings are answered by the socket. Either
                    // still proves the relay is there.
                    Some(Ok(_)) => self.watchdogs.heard(false),
                    Some(Err(err)) => return EndCause::Transport(format!("read failed: {err}")),
                    None => {
                        return EndCause::Transport("connection closed without a Close frame".into());
                    }
                },
                alarm = self.watchdogs.next_alarm() => match alarm {
                    Alarm::Silence(after) => return EndCause::Silence(after),
                    Alarm::Finish => finish.notify_one(),
                },
            }
        }
    }

    /// Queues a message the reader makes itself (pong, refusals). Never waits: when the
    /// writer is this far behind the socket is stuck, and the relay's ping timeout or our
    /// silence watchdog will replace it.
    fn send_now(&self, text: String) {
        if self.out_tx.try_send(Outbound::free(text)).is_err() {
            debug!(relay = %self.relay, "tunnel queue full; dropped a message");
        }
    }

    /// Handles one text frame. Nothing here ends the tunnel: bad input is logged and
    /// dropped.
    fn on_text(&mut self, text: &str) {
        let message = match RelayMessage::parse(text) {
            Decoded::Message(message) => message,
            Decoded::UnknownType(kind) => {
                debug!(%kind, "ignored a message of unknown type");
                return;
            }
            Decoded::Malformed { reason, .. } => {
                debug!(%reason, "ignored a malformed message");
                return;
            }
        };
        match message {
            RelayMessage::Ping => {
                self.send_now(HostMessage::Pong.to_json());
                self.channels.retain(|_, h| !h.tx.is_closed());
            }
            RelayMessage::Http {
                id,
                method,
                path,
                headers,
                body,
            } => self.start_exchange(id.into_owned(), &method, &path, &headers, body),
            RelayMessage::WsOpen { id, path, query } => {
                self.open_channel(id.into_owned(), &path, query.as_deref());
            }
            RelayMessage::WsFrame { id, data } => {
                let Some(handle) = self.channels.get_mut(id.as_ref()) else {
                    debug!(channel = %id, "frame for an unknown channel");
                    return;
                };
                let frame: Frame = data.into();
                let cost = frame.queued_cost();
                let queued = handle.queued.load(Ordering::Relaxed);
                // A frame larger than the whole budget still goes to an empty queue.
                let full = queued > 0 && queued + cost > CHANNEL_QUEUE_BYTES;
                let sent = if full {
                    Err(Overflow::Full)
                } else {
                    match handle.tx.try_send(ChannelCommand::Frame(frame)) {
                        Ok(()) => {
                            handle.queued.fetch_add(cost, Ordering::Relaxed);
                            Ok(())
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => Err(Overflow::Full),
                        Err(mpsc::error::TrySendError::Closed(_)) => Err(Overflow::Gone),
                    }
                };
                match sent {
                    Ok(()) => {}
                    Err(Overflow::Full) => {
                        // v1 has no flow control: one slow local socket is closed rather
                        // than stalling every stream of the tunnel.
                        warn!(channel = %id, "local WebSocket fell behind; closed it with 1013");
                        handle.kill(close_code::TRY_AGAIN_LATER);
                        self.channels.remove(id.as_ref());
                        self.send_now(
                            HostMessage::WsClose {
                                id,
                                code: Some(close_code::TRY_AGAIN_LATER),
                            }
                            .to_json(),
                        );
                    }
                    Err(Overflow::Gone) => {
                        self.channels.remove(id.as_ref());
                    }
                }
            }
            RelayMessage::WsClose { id, code } => {
                if let Some(mut handle) = self.channels.remove(id.as_ref())
                    && let Err(mpsc::error::TrySendError::Full(_)) =
                        handle.tx.try_send(ChannelCommand::Close(code))
                {
                    handle.kill(code.unwrap_or(close_code::GOING_AWAY));
                }
            }
            RelayMessage::Drain { reason } => self.watchdogs.drain(reason.map(Cow::into_owned)),
        }
    }

    /// Forwards one exchange to the upstream in its own task; at most [`MAX_IN_FLIGHT`]
    /// at once, beyond which the relay gets 503 at once (it never sends that many).
    fn start_exchange(
        &mut self,
        id: String,
        method: &str,
        path: &str,
        headers: &Headers,
        body: Payload<'_>,
    ) {
        let Ok(permit) = self.exchanges.clone().try_acquire_owned() else {
            warn!(relay = %self.relay, "{MAX_IN_FLIGHT} exchanges in flight; answered 503");
            let overloaded = Answer {
                status: 503,
                headers: Headers::default(),
                body: Bytes::from_static(b"agent overloaded\n"),
            };
            self.send_now(overloaded.to_json(&id));
            return;
        };
        let request = build_request(method, path, headers, body.into_bytes());
        let in_flight = InFlight::new(&self.in_flight);
        let upstream = self.shared.upstream.clone();
        let out = self.out_tx.clone();
        let cancel = self.work_cancel.clone();
        let answers = self.answers.clone();
        self.shared.tasks.spawn(async move {
            let _permit = permit;
            let _in_flight = in_flight;
            tokio::select! {
                () = async {
                    let (answer, held) = match request {
                        Ok(request) => exchange(&upstream, request, &answers).await,
                        Err(failure) => (Answer::of(failure.response()).await, Held::default()),
                    };
                    let text = answer.to_json(&id);
                    drop(answer);
                    // Waits while the writer is behind: backpressure.
                    let _ = out.send(Outbound { text, _held: held }).await;
                } => {}
                // The tunnel is gone: the relay already failed this exchange.
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Opens a channel to the local service in its own task.
    fn open_channel(&mut self, id: String, path: &str, query: Option<&str>) {
        if self.channels.get(&id).is_some_and(|h| !h.tx.is_closed()) {
            debug!(channel = %id, "ws:open for a channel already open; ignored");
            return;
        }
        if self.channels.len() >= MAX_CHANNELS {
            self.channels.retain(|_, h| !h.tx.is_closed());
        }
        if self.channels.len() >= MAX_CHANNELS {
            warn!(relay = %self.relay, "{MAX_CHANNELS} channels open; refused one with 1013");
            self.send_now(
                HostMessage::WsClose {
                    id: Cow::Owned(id),
                    code: Some(close_code::TRY_AGAIN_LATER),
                }
                .to_json(),
            );
            return;
        }
        let (tx, commands) = mpsc::channel(CHANNEL_QUEUE);
        let (kill_tx, kill) = oneshot::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.channels.insert(
            id.clone(),
            ChannelHandle {
                tx,
                queued: Arc::clone(&queued),
                kill: Some(kill_tx),
            },
        );
        let url = self.shared.upstream.url().ws_url(path, query);
        let upstream = self.shared.upstream.clone();
        let io = ChannelIo {
            id,
            commands,
            kill,
            out: self.out_tx.clone(),
            answers: self.answers.clone(),
            cancel: self.work_cancel.clone(),
            queued,
        };
        let in_flight = InFlight::new(&self.in_flight);
        self.shared.tasks.spawn(async move {
            let _in_flight = in_flight;
            run_channel(&upstream, url, io).await;
        });
    }
}

/// Writes queued messages, in batches, until the socket fails or `finish` asks it to end
/// a drained tunnel (then it writes everything already queued first).
async fn write_loop<W>(
    sink: &mut W,
    out_rx: &mut mpsc::Receiver<Outbound>,
    finish: &Notify,
) -> EndCause
where
    W: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    loop {
        // Both branches are cancel safe: `recv` loses nothing, and a `Notified` dropped
        // after being notified passes its permit on.
        let (first, limit) = tokio::select! {
            biased;
            text = out_rx.recv() => match text {
                Some(text) => (text, MAX_BATCH),
                // The session holds a sender: this only happens once it is gone.
                None => return std::future::pending().await,
            },
            () = finish.notified() => match out_rx.try_recv() {
                Ok(text) => (text, usize::MAX),
                Err(_) => return EndCause::Drained,
            },
        };
        let mut next = Some(first);
        let mut batch = 0;
        let mut yielded = false;
        // What the batch's messages hold of the budget, given back once they are out.
        let mut written = Held::default();
        loop {
            while let Some(Outbound { text, _held: held }) = next {
                debug_assert!(text.len() <= MAX_TUNNEL_MESSAGE);
                written.merge(held);
                if let Err(err) = sink.feed(Message::Text(text.into())).await {
                    return EndCause::Transport(format!("write failed: {err}"));
                }
                batch += 1;
                next = if batch < limit {
                    out_rx.try_recv().ok()
                } else {
                    None
                };
            }
            if yielded || batch >= limit {
                break;
            }
            // A short batch: let the exchanges finishing at this same instant on other
            // tasks queue their answers, so they share one write (and one wake-up of the
            // relay). The proxy benchmark's v1 host does the same: without it, 17-28 %
            // more CPU per request on both ends under load (BENCHMARKS.md).
            tokio::task::yield_now().await;
            yielded = true;
            next = out_rx.try_recv().ok();
            if next.is_none() {
                break;
            }
        }
        if let Err(err) = sink.flush().await {
            return EndCause::Transport(format!("write failed: {err}"));
        }
        drop(written);
        // Finishing: everything queued is written.
        if limit == usize::MAX {
            return EndCause::Drained;
        }
    }
}

/// This side closes: writes what is already queued (answers that are ready), sends Close
/// 1000, and waits for the relay's Close, all within [`CLOSE_GRACE`].
async fn close_gracefully<W, R>(
    sink: &mut W,
    stream: &mut R,
    out_rx: &mut mpsc::Receiver<Outbound>,
    reason: &str,
) where
    W: Sink<Message, Error = tungstenite::Error> + Unpin,
    R: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let _ = timeout(CLOSE_GRACE, async {
        out_rx.close();
        while let Ok(outbound) = out_rx.try_recv() {
            if sink
                .feed(Message::Text(outbound.text.into()))
                .await
                .is_err()
            {
                return;
            }
        }
        let frame = CloseFrame {
            code: close_code::NORMAL.into(),
            reason: crate::websocket::close_reason(reason).into(),
        };
        if sink.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// An exchange's answer, as v1 carries it: the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    headers: Headers,
    body: Bytes,
}

impl Answer {
    /// Collects `response` whole, up to [`MAX_RESPONSE_BYTES`]; a larger or broken body
    /// becomes a 502.
    async fn of<B>(response: Response<B>) -> Answer
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display + Send + Sync + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut parts, body) = response.into_parts();
        let body = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                let why = if err.is::<http_body_util::LengthLimitError>() {
                    format!("response body over {MAX_RESPONSE_BYTES} bytes")
                } else {
                    format!("reading the response body: {err}")
                };
                debug!(error = %why, "upstream answer unusable; answered 502");
                return Answer::error(502, "upstream unavailable");
            }
        };
        headers::from_upstream(&mut parts.headers);
        // The relay frames the body itself.
        parts.headers.remove(header::CONTENT_LENGTH);
        Answer {
            status: parts.status.as_u16(),
            headers: Headers::from_response_map(&parts.headers),
            body,
        }
    }

    /// [`Answer::of`], with the answer charged to `answers` until its message is written:
    /// three times its length (the body, and its message: base64 takes 4/3, escaping
    /// more), before it is read when the length is known (waiting for room), else chunk by
    /// chunk, and a 502 when there is no room.
    async fn charged<B>(response: Response<B>, answers: &Budget) -> (Answer, Held)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display + Send + Sync + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        const PER_BYTE: usize = 3;
        let length = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|length| *length <= MAX_RESPONSE_BYTES);
        let (parts, mut body) = response.into_parts();
        let mut held = match length {
            Some(length) => answers.take(length * PER_BYTE).await,
            None => Held::default(),
        };
        let mut whole = bytes::BytesMut::with_capacity(length.unwrap_or(0));
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                debug!("upstream answer unusable (reading the body failed); answered 502");
                return (Answer::error(502, "upstream unavailable"), Held::default());
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if whole.len() + data.len() > MAX_RESPONSE_BYTES {
                debug!("upstream answer over {MAX_RESPONSE_BYTES} bytes; answered 502");
                return (Answer::error(502, "upstream unavailable"), Held::default());
            }
            if length.is_none() {
                let Some(more) = answers.try_take_now(data.len() * PER_BYTE) else {
                    warn!("answers waiting for the relay fill the agent's budget; answered 502");
                    return (Answer::error(502, "agent busy"), Held::default());
                };
                held.merge(more);
            }
            whole.extend_from_slice(&data);
        }
        let whole = Response::from_parts(parts, http_body_util::Full::new(whole.freeze()));
        (Answer::of(whole).await, held)
    }

    /// An answer the agent makes itself, in the relay's shape: `{"error": message}`.
    fn error(status: u16, message: &str) -> Answer {
        Answer {
            status,
            headers: Headers(vec![("content-type".into(), "application/json".into())]),
            body: Bytes::from(serde_json::json!({ "error": message }).to_string()),
        }
    }

    /// The `http:response` text: a UTF-8 body as-is, any other as base64. One that would
    /// not fit a relay frame becomes a 502 (the relay would close the whole tunnel over a
    /// frame that large).
    fn to_json(&self, id: &str) -> String {
        let message = HostMessage::HttpResponse {
            id: Cow::Borrowed(id),
            status: self.status,
            headers: Cow::Borrowed(&self.headers),
            body: Payload::of_bytes(&self.body),
        };
        let text = message.to_json();
        if text.len() <= MAX_TUNNEL_MESSAGE {
            return text;
        }
        warn!(
            bytes = text.len(),
            "upstream response too large for one tunnel frame; answered 502"
        );
        Answer::error(502, "upstream response too large").to_json(id)
    }
}

/// The upstream request for a v1 `http` message.
fn build_request(
    method: &str,
    path: &str,
    headers: &Headers,
    body: Vec<u8>,
) -> Result<Request<Body>, Failure> {
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| Failure::BadRequest("invalid method"))?;
    let uri: http::Uri = path
        .parse()
        .map_err(|_| Failure::BadRequest("invalid path"))?;
    // A header the relay let through but HTTP cannot carry is dropped, not fatal.
    let (headers, _skipped) = headers.to_map();
    let mut request = Request::new(Body::from(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// One exchange with the upstream, answered whole; within [`UPSTREAM_TIMEOUT`] in all.
async fn exchange(upstream: &Upstream, request: Request<Body>, answers: &Budget) -> (Answer, Held) {
    let answer = timeout(UPSTREAM_TIMEOUT, async {
        match upstream.send(request).await {
            Ok(response) => Answer::charged(response, answers).await,
            Err(failure) => (Answer::of(failure.response()).await, Held::default()),
        }
    })
    .await;
    match answer {
        Ok(answer) => answer,
        Err(_) => (
            Answer::of(Failure::TimedOut.response()).await,
            Held::default(),
        ),
    }
}

/// Why a frame could not be queued for its channel.
enum Overflow {
    /// The queue holds its frames or bytes: the local socket fell behind.
    Full,
    /// The channel's task is gone.
    Gone,
}

/// What the tunnel tells one channel.
#[derive(Debug)]
enum ChannelCommand {
    /// A client frame to pass on.
    Frame(Frame),
    /// The client closed (with its code): close the local socket.
    Close(Option<u16>),
}

/// One channel's wiring to its tunnel.
#[derive(Debug)]
struct ChannelIo {
    /// The channel id on the tunnel.
    id: String,
    /// Client frames and the client's close, in order.
    commands: mpsc::Receiver<ChannelCommand>,
    /// Bytes of frames in `commands`, given back as they are taken.
    queued: Arc<AtomicUsize>,
    /// Fires (with the code to close with) when the tunnel gives up on this channel out
    /// of band (its queue overflowed).
    kill: oneshot::Receiver<u16>,
    /// The tunnel's outbound queue.
    out: mpsc::Sender<Outbound>,
    /// The tunnel's answer budget: local frames hold it until written.
    answers: Budget,
    /// Cancelled when the tunnel ends: close the local socket with 1001.
    cancel: CancellationToken,
}

type LocalSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs one WebSocket channel: opens `url` on the local service and carries frames both
/// ways until either side closes or the tunnel ends. A socket that cannot be opened is
/// reported with `ws:close` 1011.
///
/// # Cancel safety
/// Not cancel safe (it would drop the local socket without a Close frame); end it through
/// `io.cancel`.
async fn run_channel(upstream: &Upstream, url: String, mut io: ChannelIo) {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_CHANNEL_MESSAGE);
    config.max_frame_size = Some(MAX_CHANNEL_MESSAGE);
    let connect = timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
    );
    let socket = tokio::select! {
        result = connect => match result {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(err)) => {
                upstream.warn_failure(
                    &Failure::Unavailable(super::error_chain(&err)),
                    Answered::ChannelClosed,
                );
                close_relay_side(&io, Some(close_code::INTERNAL)).await;
                return;
            }
            Err(_) => {
                upstream.warn_failure(&Failure::TimedOut, Answered::ChannelClosed);
                close_relay_side(&io, Some(close_code::INTERNAL)).await;
                return;
            }
        },
        () = io.cancel.cancelled() => return,
        _ = &mut io.kill => return,
    };
    carry(socket, &mut io).await;
}

/// Carries frames between the local socket and the tunnel until one side ends.
async fn carry(socket: LocalSocket, io: &mut ChannelIo) {
    let (mut local_tx, mut local_rx) = socket.split();
    // The kill signal only counts when it was sent: its sender is also dropped, without a
    // word, when the tunnel forgets a channel after queueing its Close(code), and that
    // must not race the queued code into a 1001.
    let mut kill_armed = true;
    let close_local = loop {
        tokio::select! {
            // Queued commands first: a Close(code) queued before a kill wins.
            biased;
            command = io.commands.recv() => match command {
                Some(ChannelCommand::Frame(frame)) => {
                    io.queued.fetch_sub(frame.queued_cost(), Ordering::Relaxed);
                    let message = match frame {
                        Frame::Text(text) => Message::Text(text.into()),
                        Frame::Binary(bytes) => Message::Binary(bytes),
                    };
                    if let Err(err) = local_tx.send(message).await {
                        debug!(channel = %io.id, error = %err, "local WebSocket write failed");
                        close_relay_side(io, Some(close_code::INTERNAL)).await;
                        return;
                    }
                }
                // The client closed; the relay has forgotten the channel already.
                Some(ChannelCommand::Close(code)) => break code,
                // The tunnel dropped the channel (it is ending).
                None => break Some(close_code::GOING_AWAY),
            },
            message = local_rx.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Err(code) = forward(io, Frame::Text(text.as_str().to_owned())).await {
                        break Some(code);
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if let Err(code) = forward(io, Frame::Binary(bytes)).await {
                        break Some(code);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).filter(|c| close_code::is_sendable(*c));
                    close_relay_side(io, code).await;
                    // The socket answers the Close on the next flush.
                    let _ = timeout(CLOSE_GRACE, local_tx.close()).await;
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(tungstenite::Error::Capacity(_))) => {
                    close_relay_side(io, Some(close_code::TOO_BIG)).await;
                    break Some(close_code::TOO_BIG);
                }
                Some(Err(_)) | None => {
                    close_relay_side(io, Some(close_code::INTERNAL)).await;
                    return;
                }
            },
            code = &mut io.kill, if kill_armed => match code {
                Ok(code) => break Some(code),
                Err(_) => kill_armed = false,
            },
            () = io.cancel.cancelled() => break Some(close_code::GOING_AWAY),
        }
    };
    // We close: send our Close and wait (bounded) for the local side's.
    let frame = close_local
        .filter(|c| close_code::is_sendable(*c))
        .map(|code| CloseFrame {
            code: code.into(),
            reason: "".into(),
        });
    let _ = timeout(CLOSE_GRACE, async {
        if local_tx.send(Message::Close(frame)).await.is_ok() {
            while let Some(Ok(message)) = local_rx.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}

/// Sends one local frame to the client. `Err(code)` when the channel is over and the local
/// socket is to be closed with `code`: the frame was too large for a relay frame (the
/// relay side is closed with 1009 first), or the tunnel is gone.
async fn forward(io: &ChannelIo, frame: Frame) -> Result<(), u16> {
    let text = HostMessage::WsFrame {
        id: Cow::Borrowed(&io.id),
        data: Payload::from(&frame),
    }
    .to_json();
    if text.len() > MAX_TUNNEL_MESSAGE {
        debug!(channel = %io.id, bytes = text.len(), "local frame too large for the tunnel");
        close_relay_side(io, Some(close_code::TOO_BIG)).await;
        return Err(close_code::TOO_BIG);
    }
    // Waits while the tunnel's budget or queue is full: backpressure onto the local socket.
    let held = io.answers.take(text.len()).await;
    io.out
        .send(Outbound { text, _held: held })
        .await
        .map_err(|_| close_code::GOING_AWAY)
}

/// Tells the relay the local side of the channel closed.
async fn close_relay_side(io: &ChannelIo, code: Option<u16>) {
    let text = HostMessage::WsClose {
        id: Cow::Borrowed(&io.id),
        code,
    }
    .to_json();
    let _ = io.out.send(Outbound::free(text)).await;
}

#[cfg(test)]
mod tests;
