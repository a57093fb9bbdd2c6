//! The tunnel actor: owns one host's socket and runs it until it ends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt, Stream as FutStream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tracing::{debug, warn};

use std::borrow::Cow;

use super::streams::{Delivery, Stream, StreamTable};
use super::{Command, Failure, HttpRequest, HttpResponse};
use crate::budget::Charge;
use crate::limits::{CLOSE_TIMEOUT, DRAIN_CLOSE_WAIT, Limits};
use crate::protocol::v1::{Decoded, Headers, HostMessage, Payload, RelayMessage};
use crate::protocol::{StreamId, close_code};
use crate::telemetry;
use crate::tunnel::{ExchangeError, SessionEnd, TunnelHandle};

/// Commands written to the socket before one flush: batching small messages into one
/// write matters under load, and the cap keeps one burst from delaying pings.
const MAX_BATCH: usize = 64;

/// The actor of one v1 tunnel. Built by [`TunnelHandle::new_v1`]; run it with the socket.
#[derive(Debug)]
pub struct Session {
    handle: TunnelHandle,
    rx: mpsc::Receiver<Command>,
    limits: Limits,
}

/// State shared by the reader and writer halves of one session. Both run inside the
/// session's single task, so the lock is never contended; it is a Mutex only because the
/// two halves are separate futures. It is never held across an await.
struct Shared {
    streams: Mutex<StreamTable>,
    /// Pings sent since the last pong.
    unanswered_pings: AtomicU32,
    /// Whether the host has been sent `drain`: a 4001 close is always preceded by one.
    drain_sent: AtomicBool,
}

impl Shared {
    fn streams(&self) -> std::sync::MutexGuard<'_, StreamTable> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Session {
    pub(crate) fn new(
        handle: TunnelHandle,
        rx: mpsc::Receiver<Command>,
        limits: Limits,
    ) -> Session {
        Session { handle, rx, limits }
    }

    /// Runs the tunnel over `socket` until the host goes, a ping times out, or a handle
    /// closes it. Then fails every pending exchange at once, closes every channel (1001),
    /// and closes the socket. `on_pong` is called for every pong (directory heartbeat).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future drops the socket without a Close frame and
    /// leaves exchanges to fail when their senders drop. Close through the handle instead.
    pub async fn run<S>(mut self, socket: S, on_pong: impl Fn() + Send) -> SessionEnd
    where
        S: FutStream<Item = Result<Message, axum::Error>>
            + Sink<Message, Error = axum::Error>
            + Unpin
            + Send,
    {
        let (mut sink, mut stream) = socket.split();
        let shared = Shared {
            streams: Mutex::new(StreamTable::default()),
            unanswered_pings: AtomicU32::new(0),
            drain_sent: AtomicBool::new(false),
        };
        let cancel = self.handle.cancel_token().clone();
        let end = tokio::select! {
            end = write_loop(&mut sink, &mut self.rx, &shared, &self.limits, &self.handle) => end,
            end = read_loop(&mut stream, &self.handle, &shared, &on_pong) => end,
            () = cancel.cancelled() => self.handle.closed_with(),
        };
        // No handle can queue more work from here. Requests queued but never written go
        // back to their handlers, to be routed again (to a newer tunnel, another relay);
        // the rest of what was queued is dropped.
        self.handle.cancel_token().cancel();
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            if let Command::Http {
                request, respond, ..
            } = command
            {
                let _ = respond.send(Err(Failure::NotDelivered(request)));
            }
        }

        if end == SessionEnd::Closed(close_code::DRAINING) {
            self.finish_draining(&mut sink, &mut stream, &shared, &on_pong)
                .await;
        } else {
            shared.streams().fail_all(close_code::GOING_AWAY);
            close_socket(&mut sink, &mut stream, &end).await;
        }
        end
    }

    /// The end of a drained tunnel: `drain` (if the host missed it); then, for at most
    /// [`DRAIN_CLOSE_WAIT`], answers to exchanges already in flight are still delivered
    /// until none is left; then Close 4001, and answers still arriving before the host's
    /// Close (at most [`CLOSE_TIMEOUT`]) are delivered too. Whatever is left then fails,
    /// and channels close with 1001.
    ///
    /// The wait comes before the Close, not after it: a host's WebSocket library answers
    /// a Close at once and sends nothing after it (tungstenite, browsers' and Node's `ws`
    /// all do), so answers are only ever possible before it.
    async fn finish_draining<W, R>(
        &self,
        sink: &mut W,
        stream: &mut R,
        shared: &Shared,
        on_pong: &(impl Fn() + Send),
    ) where
        W: Sink<Message, Error = axum::Error> + Unpin,
        R: FutStream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let host_closed = timeout(DRAIN_CLOSE_WAIT, async {
            // The contract: a host always reads `drain` before a 4001 close, so it knows
            // to reconnect at once (and elsewhere) even if the close frame is lost.
            if !shared.drain_sent.load(Ordering::Relaxed) {
                let drain = RelayMessage::Drain {
                    reason: Some(Cow::Borrowed(crate::protocol::DRAIN_REASON)),
                };
                sink.send(Message::Text(drain.to_json().into())).await?;
            }
            while !shared.streams().is_idle() {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        on_text(text.as_str(), &self.handle, shared, on_pong);
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(true),
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(err),
                }
            }
            Ok::<_, axum::Error>(false)
        })
        .await;
        if matches!(host_closed, Ok(Ok(true) | Err(_))) {
            let (exchanges, channels) = shared.streams().fail_all(close_code::GOING_AWAY);
            telemetry::drain_cut(exchanges, channels);
            return;
        }
        let _ = timeout(CLOSE_TIMEOUT, async {
            let (code, reason) = SessionEnd::Closed(close_code::DRAINING)
                .close_frame()
                .unwrap_or((close_code::DRAINING, ""));
            sink.send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await?;
            while let Some(message) = stream.next().await {
                match message? {
                    Message::Text(text) => on_text(text.as_str(), &self.handle, shared, on_pong),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            Ok::<_, axum::Error>(())
        })
        .await;
        let (exchanges, channels) = shared.streams().fail_all(close_code::GOING_AWAY);
        telemetry::drain_cut(exchanges, channels);
    }
}

/// Writes commands and pings to the host until the writer fails, pings time out, or the
/// tunnel is closed through a handle. Once closed, it takes nothing more from the queue,
/// so that what is still queued can be handed back undelivered.
async fn write_loop<S>(
    sink: &mut S,
    rx: &mut mpsc::Receiver<Command>,
    shared: &Shared,
    limits: &Limits,
    handle: &TunnelHandle,
) -> SessionEnd
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let cancel = handle.cancel_token();
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut ping = interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = &mut cancelled => return handle.closed_with(),
            command = rx.recv() => {
                let Some(command) = command else {
                    // Unreachable while the session's own handle is alive; end cleanly.
                    return SessionEnd::Closed(close_code::GOING_AWAY);
                };
                let mut batch = 0;
                let mut next = Some(command);
                // What the batch's messages were charged, given back once they are out.
                let mut written = Charge::default();
                while let Some(command) = next {
                    if let Some(text) = apply(command, shared, &mut written)
                        && let Err(err) = sink.feed(Message::Text(text.into())).await
                    {
                        return SessionEnd::HostGone(format!("write failed: {err}"));
                    }
                    batch += 1;
                    next = if batch < MAX_BATCH && !cancel.is_cancelled() {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                if let Err(err) = sink.flush().await {
                    return SessionEnd::HostGone(format!("write failed: {err}"));
                }
                drop(written);
            }
            _ = ping.tick() => {
                if shared.unanswered_pings.fetch_add(1, Ordering::Relaxed) >= limits.max_missed_pongs {
                    return SessionEnd::PingTimeout;
                }
                let pruned = shared.streams().prune_abandoned();
                if pruned > 0 {
                    debug!(pruned, "dropped streams whose client stopped waiting");
                }
                if let Err(err) = sink.send(Message::Text(RelayMessage::Ping.to_json().into())).await {
                    return SessionEnd::HostGone(format!("write failed: {err}"));
                }
            }
        }
    }
}

/// Applies one command to the stream table; returns the v1 message to send, if any, and
/// adds what its payload was charged to `written`.
fn apply(command: Command, shared: &Shared, written: &mut Charge) -> Option<String> {
    match command {
        Command::Http {
            id,
            request,
            respond,
        } => {
            if respond.is_closed() {
                // The client gave up while the command waited in the queue.
                return None;
            }
            let HttpRequest {
                parts,
                body,
                charge,
            } = *request;
            written.merge(charge);
            let text = RelayMessage::Http {
                id: Cow::Owned(id.to_string()),
                method: Cow::Borrowed(parts.method.as_str()),
                path: Cow::Borrowed(parts.uri.path_and_query().map_or("/", |p| p.as_str())),
                headers: Cow::Owned(Headers::from_map(&parts.headers)),
                body: Payload::Text(Cow::Borrowed(&body)),
            }
            .to_json();
            shared.streams().insert(id, Stream::Exchange(respond));
            Some(text)
        }
        Command::Abandon { id } => {
            shared.streams().abandon(id);
            None
        }
        Command::OpenChannel {
            id,
            path,
            query,
            to_client,
        } => {
            shared.streams().insert(id, Stream::Channel(to_client));
            Some(
                RelayMessage::WsOpen {
                    id: Cow::Owned(id.to_string()),
                    path: Cow::Owned(path),
                    query: query.map(Cow::Owned),
                }
                .to_json(),
            )
        }
        Command::ChannelFrame { id, frame, charge } => {
            written.merge(charge);
            if !shared.streams().has_channel(id) {
                // The host closed it first; the client is being told.
                return None;
            }
            Some(
                RelayMessage::WsFrame {
                    id: Cow::Owned(id.to_string()),
                    data: Payload::from(&frame),
                }
                .to_json(),
            )
        }
        Command::CloseChannel { id, code } => {
            // Only tell the host if the channel was still open on its side.
            shared.streams().forget_channel(id).then(|| {
                RelayMessage::WsClose {
                    id: Cow::Owned(id.to_string()),
                    code,
                }
                .to_json()
            })
        }
        Command::NotifyClosed { id, code } => Some(
            RelayMessage::WsClose {
                id: Cow::Owned(id.to_string()),
                code: Some(code),
            }
            .to_json(),
        ),
        Command::Ping => {
            shared.unanswered_pings.fetch_add(1, Ordering::Relaxed);
            Some(RelayMessage::Ping.to_json())
        }
        Command::Drain { reason } => {
            shared.drain_sent.store(true, Ordering::Relaxed);
            Some(
                RelayMessage::Drain {
                    reason: Some(Cow::Owned(reason)),
                }
                .to_json(),
            )
        }
    }
}

/// Reads host messages until the socket ends.
async fn read_loop<S>(
    stream: &mut S,
    handle: &TunnelHandle,
    shared: &Shared,
    on_pong: &(impl Fn() + Send),
) -> SessionEnd
where
    S: FutStream<Item = Result<Message, axum::Error>> + Unpin,
{
    while let Some(message) = stream.next().await {
        match message {
            Ok(Message::Text(text)) => on_text(text.as_str(), handle, shared, on_pong),
            Ok(Message::Binary(_)) => {
                // v1 is text frames only; a later negotiated version may change that.
                telemetry::message_ignored("binary");
            }
            Ok(Message::Close(frame)) => {
                return SessionEnd::HostClosed(frame.map(|f| f.code));
            }
            // WebSocket-level pings are answered by the socket itself.
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Err(err) => {
                return if crate::websocket::is_too_big(&err) {
                    SessionEnd::TooBig
                } else {
                    SessionEnd::HostGone("read failed".into())
                };
            }
        }
    }
    SessionEnd::HostGone("connection closed without a Close frame".into())
}

/// Handles one text frame from the host. Nothing here can end the tunnel: bad input is
/// counted and dropped.
fn on_text(text: &str, handle: &TunnelHandle, shared: &Shared, on_pong: &impl Fn()) {
    let message = match HostMessage::parse(text) {
        Decoded::Message(message) => message,
        Decoded::UnknownType(_) => {
            telemetry::message_ignored("unknown_type");
            return;
        }
        Decoded::Malformed { reason, id } => {
            telemetry::message_ignored("malformed");
            debug!(%reason, "ignored a malformed message from the host");
            // A broken answer still fails its exchange now rather than at the timeout
            // (502); a broken frame or close for a channel closes it (1011), rather than
            // losing the frame or leaving the channel open.
            if let Some(id) = id.as_deref().and_then(StreamId::parse) {
                let mut streams = shared.streams();
                if streams.has_channel(id) {
                    streams.close_channel(id, Some(close_code::INTERNAL));
                } else {
                    streams.complete(id, Err(ExchangeError::InvalidResponse(reason.into_owned())));
                }
            }
            return;
        }
    };
    match message {
        HostMessage::Pong => {
            shared.unanswered_pings.store(0, Ordering::Relaxed);
            handle.record_pong();
            on_pong();
        }
        HostMessage::HttpResponse {
            id,
            status,
            headers,
            body,
        } => {
            let done = StreamId::parse(&id).is_some_and(|id| {
                shared.streams().complete(
                    id,
                    Ok(HttpResponse {
                        status,
                        headers: headers.into_owned(),
                        body: body.into_bytes(),
                    }),
                )
            });
            if !done {
                telemetry::message_ignored("unknown_id");
            }
        }
        HostMessage::WsFrame { id, data } => {
            let delivery = match StreamId::parse(&id) {
                Some(id) => {
                    let delivery = shared.streams().deliver(id, data.into());
                    if delivery == Delivery::Overflowed {
                        warn!(stream = %id, "client channel fell behind; closed it with 1013");
                        telemetry::channel_overflow();
                        // Tell the host; if the queue is full it learns from the next
                        // frames being ignored instead.
                        let _ = commands(handle).try_send(Command::NotifyClosed {
                            id,
                            code: close_code::TRY_AGAIN_LATER,
                        });
                    }
                    delivery
                }
                None => Delivery::UnknownId,
            };
            if delivery == Delivery::UnknownId {
                telemetry::message_ignored("unknown_id");
            }
        }
        HostMessage::WsClose { id, code } => {
            let closed =
                StreamId::parse(&id).is_some_and(|id| shared.streams().close_channel(id, code));
            if !closed {
                telemetry::message_ignored("unknown_id");
            }
        }
    }
}

/// The command queue of a v1 tunnel.
fn commands(handle: &TunnelHandle) -> &mpsc::Sender<Command> {
    match handle.link() {
        crate::tunnel::Link::V1(link) => &link.tx,
        crate::tunnel::Link::H2(_) | crate::tunnel::Link::V2(_) => {
            unreachable!("a v1 session runs a v1 tunnel")
        }
    }
}

/// Sends the relay's Close frame (when the relay is the one closing) and waits briefly for
/// the host's, so the host sees the code rather than a reset.
async fn close_socket<W, R>(sink: &mut W, stream: &mut R, end: &SessionEnd)
where
    W: Sink<Message, Error = axum::Error> + Unpin,
    R: FutStream<Item = Result<Message, axum::Error>> + Unpin,
{
    let _ = timeout(CLOSE_TIMEOUT, async {
        match end.close_frame() {
            Some((code, reason)) => {
                let reason = crate::websocket::close_reason(reason);
                if sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await
                    .is_err()
                {
                    return;
                }
                // Wait for the host's Close (or the end of the socket).
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
            // The host closed: the socket answers its Close on the next flush.
            None => {
                let _ = sink.close().await;
            }
        }
    })
    .await;
}
