//! Protocol `h2`: one HTTP/2 connection (RFC 9113) inside the tunnel's WebSocket.
//!
//! The relay is the HTTP/2 *client*, the agent its *server* in front of the local
//! service. Framing, multiplexing, flow control, HPACK, cancellation (`RST_STREAM`),
//! `GOAWAY`, trailers and extended CONNECT (RFC 8441, for WebSocket channels) all come
//! from hyper and h2; this module only carries HTTP/2's byte stream over the WebSocket:
//!
//! - **binary** WebSocket messages carry the HTTP/2 bytes, in order, with no framing of
//!   ours: message boundaries mean nothing to HTTP/2;
//! - **text** messages carry the control plane, in the JSON of v1: `ping` / `pong`
//!   (liveness and the directory heartbeat, as in v1), `drain`, and [`END`].
//!
//! **Connections come and go; the tunnel stays.** An HTTP/2 connection costs each side
//! ~40 KiB of buffers (h2's read and write buffers, HPACK, hyper's dispatch) whether it
//! carries streams or not, three times what the rest of an idle tunnel costs. So the
//! relay starts one only for its first stream, and ends it once no stream has been open
//! for a while (`--h2-idle-connection`); the next stream starts a new one over the same
//! WebSocket. Each side ends its half of a connection with the text message [`END`]
//! after its last HTTP/2 byte (hyper shut the connection down: `GOAWAY` sent or EOF
//! read), so the bytes before it belong to the old connection and the bytes after it to
//! the next: the relay ends first, the agent answers with its own [`END`] once it has read
//! the relay's, and the relay starts no new connection before it has read the agent's.
//! Only the relay (the client) starts a connection, with the HTTP/2 preface; the agent
//! (the server) starts its side when that first byte arrives.
//!
//! Negotiated with the WebSocket subprotocol [`SUBPROTOCOL`] on `GET /tunnel`; a relay or
//! agent that does not offer it speaks v1.
//!
//! [`WsIo`] is the one adapter both sides use: it turns a WebSocket into the byte stream
//! hyper drives (`AsyncRead + AsyncWrite`), hands inbound text messages to the tunnel's
//! task, sends the text messages that task queues, and runs the WebSocket's close
//! handshake. hyper owns the [`WsIo`] inside its connection task; the tunnel's task
//! reaches it through a [`Control`] handle, so nothing is locked across an await and the
//! byte path takes no lock at all.

mod gate;
pub(crate) mod stream;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The WebSocket subprotocol that asks for (and grants) protocol `h2`.
pub const SUBPROTOCOL: &str = "relay-h2";

/// The authority of every request the relay sends into an `h2` tunnel. HTTP/2 needs one
/// (`:authority`); the agent replaces it with its upstream's, and the client's own `Host`
/// travels as `X-Forwarded-Host`.
pub const AUTHORITY: &str = "tunnel";

pub use crate::limits::h2::{CLOSE_WAIT, CONTROL_QUEUE, MAX_MESSAGE};
pub(crate) use gate::Gated;

/// Spawns hyper's tasks (the connection, request bodies, upgraded streams) on a task
/// tracker, so shutdown waits for them like for every other task.
#[derive(Debug, Clone)]
pub struct Executor(pub TaskTracker);

impl<F> hyper::rt::Executor<F> for Executor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// A WebSocket message as [`WsIo`] sees it, whichever WebSocket library carries it (the
/// relay's server sockets are axum's, the agent's client sockets tokio-tungstenite's).
#[derive(Debug)]
pub enum WsEvent {
    /// HTTP/2 bytes.
    Binary(Bytes),
    /// A control message.
    Text(String),
    /// The peer's Close frame, with its code and reason when it sent one.
    Close(Option<(u16, String)>),
    /// Ping, pong, raw frame: answered by the WebSocket library itself.
    Other,
}

/// The message type of a WebSocket library, as [`WsIo`] needs it.
pub trait WsMessage: Sized {
    /// A binary message.
    fn binary(data: Bytes) -> Self;
    /// A text message.
    fn text(text: String) -> Self;
    /// A Close frame.
    fn close(code: u16, reason: &str) -> Self;
    /// What this message is.
    fn classify(self) -> WsEvent;
}

impl WsMessage for tokio_tungstenite::tungstenite::Message {
    fn binary(data: Bytes) -> Self {
        Self::Binary(data)
    }
    fn text(text: String) -> Self {
        Self::Text(text.into())
    }
    fn close(code: u16, reason: &str) -> Self {
        Self::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: reason.into(),
        }))
    }
    fn classify(self) -> WsEvent {
        match self {
            Self::Binary(data) => WsEvent::Binary(data),
            Self::Text(text) => WsEvent::Text(text.as_str().to_owned()),
            Self::Close(frame) => {
                WsEvent::Close(frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())))
            }
            Self::Ping(_) | Self::Pong(_) | Self::Frame(_) => WsEvent::Other,
        }
    }
}

impl WsMessage for axum::extract::ws::Message {
    fn binary(data: Bytes) -> Self {
        Self::Binary(data)
    }
    fn text(text: String) -> Self {
        Self::Text(text.into())
    }
    fn close(code: u16, reason: &str) -> Self {
        Self::Close(Some(axum::extract::ws::CloseFrame {
            code,
            reason: reason.into(),
        }))
    }
    fn classify(self) -> WsEvent {
        match self {
            Self::Binary(data) => WsEvent::Binary(data),
            Self::Text(text) => WsEvent::Text(text.as_str().to_owned()),
            Self::Close(frame) => {
                WsEvent::Close(frame.map(|f| (f.code, f.reason.as_str().to_owned())))
            }
            Self::Ping(_) | Self::Pong(_) => WsEvent::Other,
        }
    }
}

/// How the WebSocket under an `h2` tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The peer sent a Close frame (with its code and reason, if any).
    PeerClosed(Option<(u16, String)>),
    /// This side sent its Close frame (asked through [`Control::close`], or when
    /// HTTP/2 shut the connection down) and the handshake ended, with the peer's answer
    /// when it came.
    Closed(Option<(u16, String)>),
    /// The peer sent a message over the size limit.
    TooBig,
    /// The socket failed or ended without a Close frame.
    Gone(String),
}

/// The tunnel task's handle on a [`WsIo`] that hyper owns. Cheap to share.
#[derive(Debug)]
pub struct Control {
    state: Mutex<ControlState>,
    /// The task that drives the [`WsIo`] (hyper's connection task), woken when there is
    /// something to send.
    waker: AtomicWaker,
    /// Cancelled once the WebSocket has ended; [`Control::ended`] says how.
    ended: CancellationToken,
    /// Woken when this side has sent [`END`] or read the peer's from inside HTTP/2.
    connection_changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct ControlState {
    /// Text messages to send, bounded by [`CONTROL_QUEUE`].
    outbox: VecDeque<String>,
    /// A Close frame to send now.
    close_now: Option<(u16, String)>,
    /// The Close frame to send when HTTP/2 shuts the connection down by itself.
    on_shutdown: Option<(u16, String)>,
    /// How the WebSocket ended.
    ended: Option<Ended>,
}

impl Control {
    fn state(&self) -> std::sync::MutexGuard<'_, ControlState> {
        // Held for a queue operation at a time, never across an await.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a text message. Returns false (and drops it) when [`CONTROL_QUEUE`]
    /// messages are already waiting: the socket is stuck, and liveness will end it.
    pub fn send_text(&self, text: String) -> bool {
        {
            let mut state = self.state();
            if state.outbox.len() >= CONTROL_QUEUE || state.ended.is_some() {
                return false;
            }
            state.outbox.push_back(text);
        }
        self.waker.wake();
        true
    }

    /// Closes the WebSocket now with `code`: what is queued is dropped, HTTP/2 sees the
    /// end of its byte stream, and every stream still open fails.
    pub fn close(&self, code: u16, reason: &str) {
        self.state().close_now = Some((code, reason.to_owned()));
        self.waker.wake();
    }

    /// The Close frame to send when HTTP/2 ends the connection by itself (after a
    /// graceful shutdown: `1000` unless set).
    pub fn close_on_shutdown(&self, code: u16, reason: &str) {
        self.state().on_shutdown = Some((code, reason.to_owned()));
    }

    /// How the WebSocket ended, once it has.
    pub fn ended(&self) -> Option<Ended> {
        self.state().ended.clone()
    }

    /// Resolves once the WebSocket has ended.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_ended(&self) {
        self.ended.cancelled().await;
    }

    /// Resolves when this side has sent [`END`], or HTTP/2 has read the peer's, since
    /// the last call (a wake-up is kept until then).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn connection_changed(&self) {
        self.connection_changed.notified().await;
    }

    /// Records the end (the first one wins) and wakes whoever waits for it.
    fn finish(&self, end: Ended) {
        let mut state = self.state();
        if state.ended.is_none() {
            state.ended = Some(end);
            state.outbox.clear();
        }
        drop(state);
        self.ended.cancel();
    }
}

/// Where the close handshake is.
#[derive(Debug)]
enum Phase {
    Open,
    /// Our Close frame is queued in the socket; flushing it. The deadline runs from the
    /// start: a peer that reads nothing must not hold the socket (and its task) forever.
    Closing(Pin<Box<tokio::time::Sleep>>),
    /// Our Close frame is sent: reading until the peer's, at most until the deadline.
    CloseSent(Pin<Box<tokio::time::Sleep>>),
    /// The byte stream has ended (HTTP/2 sees EOF).
    Done,
}

/// The text message that ends one side's HTTP/2 connection inside the tunnel (see the
/// module docs). The JSON of v1's control messages, so older readers ignore it.
pub const END: &str = r#"{"type":"h2:end"}"#;

/// Whether a text message is [`END`] (in any JSON spelling of it).
pub fn is_end(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    // Cheap test first: control messages are few, but pings are many.
    text.contains("h2:end")
        && serde_json::from_str::<Typed<'_>>(text).is_ok_and(|t| t.kind == "h2:end")
}

/// What [`TunnelIo::poll_idle`] saw while no HTTP/2 connection reads the WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// The peer ended its half of the connection ([`END`]).
    PeerEnded,
    /// HTTP/2 bytes of a new connection arrived (they wait in the stream for it).
    Started,
    /// The WebSocket has ended ([`Control::ended`] says how).
    Ended,
}

/// What [`WsIo::poll_message`] read.
enum Incoming {
    /// HTTP/2 bytes.
    Bytes(Bytes),
    /// The peer's [`END`].
    End,
    /// The socket has ended ([`Control::ended`] says how).
    Ended,
    /// The socket is ending with our Close frame ([`WsIo::poll_closing`] finishes it).
    Closing,
}

/// A WebSocket as the byte stream of an HTTP/2 connection. See the module docs.
pub struct WsIo<S> {
    socket: S,
    /// Spares the socket the polls HTTP/2 makes when nothing has arrived.
    gate: gate::ReadGate,
    /// The rest of the binary message being read.
    read: Bytes,
    /// HTTP/2 bytes not yet sent as a message (at most [`MAX_MESSAGE`]).
    write: BytesMut,
    /// Inbound text messages, for the tunnel's task.
    inbox: mpsc::Sender<String>,
    control: Arc<Control>,
    phase: Phase,
    /// Called for each inbound text message dropped because the tunnel's task is behind.
    on_dropped: fn(),
    /// Where the current HTTP/2 connection is (see the module docs).
    connection: Connection,
}

/// The ends of the current HTTP/2 connection inside the tunnel.
#[derive(Debug, Default)]
struct Connection {
    /// Shutting it down sends [`END`] (not a Close frame): only the connection ends.
    end_on_shutdown: bool,
    /// [`END`] is queued in the socket.
    end_queued: bool,
    /// This side sent [`END`] after its last HTTP/2 byte.
    sent_end: bool,
    /// The peer's [`END`] arrived: what comes after belongs to the next connection.
    peer_end: bool,
}

impl<S> std::fmt::Debug for WsIo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("read", &self.read.len())
            .field("write", &self.write.len())
            .field("phase", &self.phase)
            .finish()
    }
}

impl<S, M, E> WsIo<S>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: std::error::Error + Send + Sync + 'static,
{
    /// Wraps `socket`. Returns the byte stream (for hyper), the control handle and the
    /// receiver of inbound text messages (for the tunnel's task). `on_dropped` counts
    /// text messages dropped because the receiver fell [`CONTROL_QUEUE`] behind.
    pub fn new(socket: S, on_dropped: fn()) -> (WsIo<S>, Arc<Control>, mpsc::Receiver<String>) {
        let control = Arc::new(Control {
            state: Mutex::new(ControlState::default()),
            waker: AtomicWaker::new(),
            ended: CancellationToken::new(),
            connection_changed: tokio::sync::Notify::new(),
        });
        let (inbox, inbox_rx) = mpsc::channel(CONTROL_QUEUE);
        let io = WsIo {
            socket,
            gate: gate::ReadGate::default(),
            read: Bytes::new(),
            write: BytesMut::new(),
            inbox,
            control: control.clone(),
            phase: Phase::Open,
            on_dropped,
            connection: Connection::default(),
        };
        (io, control, inbox_rx)
    }

    /// Sends [`END`] after what HTTP/2 wrote last; ready once it is flushed.
    fn poll_send_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.connection.sent_end {
            return Poll::Ready(Ok(()));
        }
        if !self.connection.end_queued {
            std::task::ready!(self.poll_send_write(cx))?;
            match Pin::new(&mut self.socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(self.fail(&err))),
                Poll::Pending => return Poll::Pending,
            }
            if let Err(err) = Pin::new(&mut self.socket).start_send(M::text(END.to_owned())) {
                return Poll::Ready(Err(self.fail(&err)));
            }
            self.connection.end_queued = true;
        }
        match Pin::new(&mut self.socket).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.connection.sent_end = true;
                self.control.connection_changed.notify_one();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(self.fail(&err))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads the WebSocket while no HTTP/2 connection does: text goes to the tunnel's
    /// task, bytes of the old connection (before the peer's [`END`]) are dropped, and
    /// the first bytes of a new one are kept for it. Also sends what the tunnel's task
    /// queued, and runs a close handshake.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Idle> {
        self.control.waker.register(cx.waker());
        if self.pump_control(cx).is_err() || !matches!(self.phase, Phase::Open) {
            return self.poll_closing(cx).map(|()| Idle::Ended);
        }
        if !self.connection.peer_end {
            // What the old connection's HTTP/2 left unread.
            self.read = Bytes::new();
        } else if !self.read.is_empty() {
            return Poll::Ready(Idle::Started);
        }
        loop {
            match std::task::ready!(self.poll_message(cx)) {
                Incoming::Bytes(data) if self.connection.peer_end => {
                    if data.is_empty() {
                        continue;
                    }
                    self.read = data;
                    return Poll::Ready(Idle::Started);
                }
                // The old connection's last bytes: nobody reads them any more.
                Incoming::Bytes(_) => {}
                Incoming::End => {
                    self.connection.peer_end = true;
                    return Poll::Ready(Idle::PeerEnded);
                }
                Incoming::Ended => return Poll::Ready(Idle::Ended),
                Incoming::Closing => return self.poll_closing(cx).map(|()| Idle::Ended),
            }
        }
    }

    /// The next message for whoever reads the WebSocket (HTTP/2 or the tunnel's task),
    /// with what both do alike already done: other text goes to the tunnel's task,
    /// pings and pongs are the library's, and the end of the socket is recorded.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Incoming> {
        loop {
            let socket = &mut self.socket;
            match std::task::ready!(self.gate.poll(cx, |cx| Pin::new(socket).poll_next(cx))) {
                None => {
                    self.finish(Ended::Gone(
                        "connection closed without a Close frame".into(),
                    ));
                    return Poll::Ready(Incoming::Ended);
                }
                Some(Err(err)) if crate::websocket::is_too_big(&err) => {
                    // The peer broke the message size limit: say so (1009) and end.
                    self.control.finish(Ended::TooBig);
                    self.start_close(
                        crate::protocol::close_code::TOO_BIG,
                        "message over the size limit",
                    );
                    return Poll::Ready(Incoming::Closing);
                }
                Some(Err(err)) => {
                    let _ = self.fail(&err);
                    return Poll::Ready(Incoming::Ended);
                }
                Some(Ok(message)) => match message.classify() {
                    WsEvent::Binary(data) => return Poll::Ready(Incoming::Bytes(data)),
                    WsEvent::Text(text) if is_end(&text) => return Poll::Ready(Incoming::End),
                    WsEvent::Text(text) => {
                        if self.inbox.try_send(text).is_err() {
                            (self.on_dropped)();
                        }
                    }
                    WsEvent::Close(frame) => {
                        // The library queued its answer: send it, then the end.
                        let _ = Pin::new(&mut self.socket).poll_flush(cx);
                        self.finish(Ended::PeerClosed(frame));
                        return Poll::Ready(Incoming::Ended);
                    }
                    WsEvent::Other => {}
                },
            }
        }
    }

    /// Sends queued text messages and a requested Close, as far as the socket takes them
    /// without waiting. Errors end the stream.
    fn pump_control(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !matches!(self.phase, Phase::Open) {
            return Ok(());
        }
        let close_now = self.control.state().close_now.take();
        if let Some((code, reason)) = close_now {
            self.start_close(code, &reason);
            return Ok(());
        }
        let mut sent = false;
        loop {
            if self.control.state().outbox.is_empty() {
                break;
            }
            match Pin::new(&mut self.socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Err(self.fail(&err)),
                Poll::Pending => break,
            }
            let Some(text) = self.control.state().outbox.pop_front() else {
                break;
            };
            if let Err(err) = Pin::new(&mut self.socket).start_send(M::text(text)) {
                return Err(self.fail(&err));
            }
            sent = true;
        }
        if sent && let Poll::Ready(Err(err)) = Pin::new(&mut self.socket).poll_flush(cx) {
            return Err(self.fail(&err));
        }
        Ok(())
    }

    /// Queues our Close frame: from here HTTP/2 reads EOF once the handshake is over.
    fn start_close(&mut self, code: u16, reason: &str) {
        let reason = crate::websocket::close_reason(reason);
        self.write.clear();
        self.control.state().outbox.clear();
        // The socket takes a Close frame whenever it is not already closed; if it is, the
        // stream is over anyway.
        if Pin::new(&mut self.socket)
            .start_send(M::close(code, reason))
            .is_err()
        {
            self.finish(Ended::Closed(None));
            return;
        }
        self.phase = Phase::Closing(Box::pin(tokio::time::sleep(CLOSE_WAIT)));
    }

    /// Drives our close handshake: flush our Close, then read until the peer's (or the
    /// deadline). Ready once the byte stream is over.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.phase {
                Phase::Open => return Poll::Ready(()),
                Phase::Done => return Poll::Ready(()),
                Phase::Closing(deadline) => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        self.finish(Ended::Closed(None));
                        return Poll::Ready(());
                    }
                    match Pin::new(&mut self.socket).poll_flush(cx) {
                        Poll::Ready(Ok(())) => {
                            let Phase::Closing(deadline) =
                                std::mem::replace(&mut self.phase, Phase::Done)
                            else {
                                unreachable!("matched above");
                            };
                            self.phase = Phase::CloseSent(deadline);
                        }
                        Poll::Ready(Err(_)) => {
                            self.finish(Ended::Closed(None));
                            return Poll::Ready(());
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Phase::CloseSent(deadline) => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        self.finish(Ended::Closed(None));
                        return Poll::Ready(());
                    }
                    let socket = &mut self.socket;
                    match self.gate.poll(cx, |cx| Pin::new(socket).poll_next(cx)) {
                        Poll::Ready(Some(Ok(message))) => {
                            if let WsEvent::Close(frame) = message.classify() {
                                self.finish(Ended::Closed(frame));
                                return Poll::Ready(());
                            }
                        }
                        Poll::Ready(Some(Err(_)) | None) => {
                            self.finish(Ended::Closed(None));
                            return Poll::Ready(());
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    /// Sends the gathered HTTP/2 bytes as one binary message, when the socket takes it.
    fn poll_send_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.socket).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(err)) => return Poll::Ready(Err(self.fail(&err))),
            Poll::Pending => return Poll::Pending,
        }
        let message = M::binary(self.write.split().freeze());
        if let Err(err) = Pin::new(&mut self.socket).start_send(message) {
            return Poll::Ready(Err(self.fail(&err)));
        }
        Poll::Ready(Ok(()))
    }

    /// Records how the socket failed; the error for HTTP/2.
    fn fail(&mut self, err: &E) -> io::Error {
        let end = if crate::websocket::is_too_big(err) {
            Ended::TooBig
        } else {
            Ended::Gone(format!("socket failed: {err}"))
        };
        self.finish(end);
        io::Error::new(io::ErrorKind::BrokenPipe, err.to_string())
    }

    fn finish(&mut self, end: Ended) {
        self.phase = Phase::Done;
        self.control.finish(end);
    }

    fn closed_error() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "tunnel WebSocket closed")
    }
}

impl<S, M, E> AsyncRead for WsIo<S>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // This task is the one to wake when the tunnel's task queues something: HTTP/2
        // always has a read pending, so registering here is enough.
        this.control.waker.register(cx.waker());
        this.pump_control(cx)?;
        if !matches!(this.phase, Phase::Open) {
            // EOF once our close handshake is over.
            return this.poll_closing(cx).map(Ok);
        }
        if this.connection.peer_end {
            // The peer ended this connection.
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.read.is_empty() {
                let n = this.read.len().min(buf.remaining());
                buf.put_slice(&this.read[..n]);
                this.read.advance(n);
                if this.read.is_empty() {
                    // An empty slice still holds the message's allocation (a share of
                    // the socket's read buffer): let it go while the tunnel is idle.
                    this.read = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(this.poll_message(cx)) {
                Incoming::Bytes(data) => this.read = data,
                Incoming::End => {
                    // EOF for this connection; the tunnel goes on.
                    this.connection.peer_end = true;
                    this.control.connection_changed.notify_one();
                    return Poll::Ready(Ok(()));
                }
                // EOF for HTTP/2 (its streams fail), with the cause kept.
                Incoming::Ended => return Poll::Ready(Ok(())),
                Incoming::Closing => return this.poll_closing(cx).map(Ok),
            }
        }
    }
}

impl<S, M, E> AsyncWrite for WsIo<S>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.pump_control(cx)?;
        if !matches!(this.phase, Phase::Open) || this.connection.end_queued {
            return Poll::Ready(Err(Self::closed_error()));
        }
        if this.write.len() >= MAX_MESSAGE {
            std::task::ready!(this.poll_send_write(cx))?;
        }
        let n = data.len().min(MAX_MESSAGE - this.write.len());
        this.write.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.pump_control(cx)?;
        if !matches!(this.phase, Phase::Open) || this.connection.end_queued {
            return Poll::Ready(Err(Self::closed_error()));
        }
        std::task::ready!(this.poll_send_write(cx))?;
        match Pin::new(&mut this.socket).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => Poll::Ready(Err(this.fail(&err))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Open) {
            // HTTP/2 ends the connection (graceful shutdown done, EOF read, or a protocol
            // error it already reported with GOAWAY): what it wrote last goes first.
            let close = this.control.state().on_shutdown.clone();
            match close {
                // The tunnel ends with it.
                Some((code, reason)) => {
                    std::task::ready!(this.poll_send_write(cx))?;
                    this.start_close(code, &reason);
                }
                // Only this connection ends (see the module docs).
                None if this.connection.end_on_shutdown || this.connection.peer_end => {
                    return this.poll_send_end(cx);
                }
                None => {
                    std::task::ready!(this.poll_send_write(cx))?;
                    this.start_close(crate::protocol::close_code::NORMAL, "");
                }
            }
        }
        this.poll_closing(cx).map(Ok)
    }
}

impl<S> Drop for WsIo<S> {
    fn drop(&mut self) {
        // hyper dropped the connection (done, or failed) before the WebSocket ended.
        if !self.control.ended.is_cancelled() {
            let mut state = self.control.state();
            if state.ended.is_none() {
                state.ended = Some(Ended::Gone("HTTP/2 connection ended".into()));
            }
            drop(state);
            self.control.ended.cancel();
        }
    }
}

/// A tunnel's [`WsIo`], shared between the HTTP/2 connection of the moment (through a
/// [`ConnectionIo`]) and the tunnel's task, which reads the WebSocket itself
/// ([`TunnelIo::poll_idle`]) while no connection does. One of them polls it at a time; the
/// lock is only held inside a poll, never across an await.
pub struct TunnelIo<S> {
    io: Arc<Mutex<WsIo<S>>>,
}

impl<S> Clone for TunnelIo<S> {
    fn clone(&self) -> Self {
        TunnelIo {
            io: self.io.clone(),
        }
    }
}

impl<S> std::fmt::Debug for TunnelIo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelIo").finish_non_exhaustive()
    }
}

impl<S, M, E> TunnelIo<S>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: std::error::Error + Send + Sync + 'static,
{
    /// Wraps `socket` with no HTTP/2 connection yet. See [`WsIo::new`].
    pub fn new(socket: S, on_dropped: fn()) -> (TunnelIo<S>, Arc<Control>, mpsc::Receiver<String>) {
        let (mut io, control, inbox) = WsIo::new(socket, on_dropped);
        // Between connections: the (absent) previous one has ended on both sides.
        io.connection = Connection {
            end_on_shutdown: false,
            end_queued: true,
            sent_end: true,
            peer_end: true,
        };
        let shared = TunnelIo {
            io: Arc::new(Mutex::new(io)),
        };
        (shared, control, inbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WsIo<S>> {
        // Held for one poll at a time, never across an await.
        self.io
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The byte stream of a new HTTP/2 connection. Only once the previous one has ended
    /// on both sides ([`TunnelIo::between_connections`]).
    pub fn start_connection(&self) -> ConnectionIo<S> {
        self.lock().connection = Connection::default();
        ConnectionIo {
            shared: self.clone(),
        }
    }

    /// This side ends the current connection: when HTTP/2 shuts it down, [`END`] is sent
    /// instead of a Close frame.
    pub fn end_on_shutdown(&self) {
        self.lock().connection.end_on_shutdown = true;
    }

    /// Whether this side has sent [`END`] (HTTP/2 writes nothing more).
    pub fn sent_end(&self) -> bool {
        self.lock().connection.sent_end
    }

    /// Whether the current connection has ended on both sides.
    pub fn between_connections(&self) -> bool {
        let io = self.lock();
        io.connection.sent_end && io.connection.peer_end
    }

    /// Drops bytes that arrived for a connection this side did not start (the relay
    /// starts every connection).
    pub fn discard_read(&self) {
        self.lock().read = Bytes::new();
    }

    /// See `WsIo::poll_idle`. Only while no HTTP/2 connection reads the WebSocket.
    pub fn poll_idle(&self, cx: &mut Context<'_>) -> Poll<Idle> {
        self.lock().poll_idle(cx)
    }

    /// [`TunnelIo::poll_idle`] as a future.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn idle(&self) -> Idle {
        std::future::poll_fn(|cx| self.poll_idle(cx)).await
    }
}

/// The byte stream of one HTTP/2 connection inside a tunnel ([`TunnelIo::start_connection`]).
pub struct ConnectionIo<S> {
    shared: TunnelIo<S>,
}

impl<S> std::fmt::Debug for ConnectionIo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionIo").finish_non_exhaustive()
    }
}

impl<S, M, E> AsyncRead for ConnectionIo<S>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.shared.lock()).poll_read(cx, buf)
    }
}

impl<S, M, E> AsyncWrite for ConnectionIo<S>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.shared.lock()).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.shared.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.shared.lock()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    type Ws = WebSocketStream<DuplexStream>;

    async fn pair() -> (Ws, Ws) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        (
            WebSocketStream::from_raw_socket(a, Role::Client, None).await,
            WebSocketStream::from_raw_socket(b, Role::Server, None).await,
        )
    }

    fn no_drops() {}

    #[tokio::test]
    async fn bytes_cross_as_binary_messages_and_text_goes_to_the_control_plane() {
        let (a, mut b) = pair().await;
        let (mut io, control, mut inbox) = WsIo::new(a, no_drops);
        // Writes are gathered and leave as one message on flush.
        io.write_all(b"hello ").await.unwrap();
        io.write_all(b"world").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            b.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"hello world"))
        );
        // Inbound binary is read as bytes, across message boundaries.
        b.send(Message::Binary(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        b.send(Message::Text("{\"type\":\"ping\"}".into()))
            .await
            .unwrap();
        b.send(Message::Binary(Bytes::from_static(b"def")))
            .await
            .unwrap();
        let mut got = [0u8; 6];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdef");
        assert_eq!(inbox.recv().await.unwrap(), "{\"type\":\"ping\"}");
        // Text queued through the control handle is sent while the IO is driven.
        assert!(control.send_text("{\"type\":\"pong\"}".into()));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let n = io.read(&mut buf).await;
            (io, n.map(|_| buf[0]))
        });
        assert_eq!(
            b.next().await.unwrap().unwrap(),
            Message::Text("{\"type\":\"pong\"}".into())
        );
        b.send(Message::Binary(Bytes::from_static(b"z")))
            .await
            .unwrap();
        let (_io, byte) = reader.await.unwrap();
        assert_eq!(byte.unwrap(), b'z');
    }

    #[tokio::test]
    async fn large_writes_are_cut_into_bounded_messages() {
        let (a, mut b) = pair().await;
        let (mut io, _control, _inbox) = WsIo::new(a, no_drops);
        let data = vec![7u8; 3 * MAX_MESSAGE + 10];
        let writer = tokio::spawn(async move {
            io.write_all(&data).await.unwrap();
            io.flush().await.unwrap();
            io
        });
        let mut total = 0;
        while total < 3 * MAX_MESSAGE + 10 {
            match b.next().await.unwrap().unwrap() {
                Message::Binary(data) => {
                    assert!(data.len() <= MAX_MESSAGE);
                    total += data.len();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_largest_frame_leaves_as_one_message() {
        // h2 writes a DATA frame's 9-byte header, then its payload, then flushes: one
        // message, not 64 KiB and a 9-byte straggler.
        let (a, mut b) = pair().await;
        let (mut io, _control, _inbox) = WsIo::new(a, no_drops);
        let frame = crate::limits::h2::MAX_FRAME as usize;
        let writer = tokio::spawn(async move {
            io.write_all(&[0u8; 9]).await.unwrap();
            io.write_all(&vec![7u8; frame]).await.unwrap();
            io.flush().await.unwrap();
            io
        });
        match b.next().await.unwrap().unwrap() {
            Message::Binary(data) => assert_eq!(data.len(), 9 + frame),
            other => panic!("unexpected {other:?}"),
        }
        let _io = writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_close_is_eof_with_its_code() {
        let (a, mut b) = pair().await;
        let (mut io, control, _inbox) = WsIo::new(a, no_drops);
        b.send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: 4001.into(),
                reason: "draining".into(),
            },
        )))
        .await
        .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        control.wait_ended().await;
        assert_eq!(
            control.ended(),
            Some(Ended::PeerClosed(Some((4001, "draining".into()))))
        );
        // The Close was answered.
        assert!(matches!(b.next().await, Some(Ok(Message::Close(_)))));
    }

    #[tokio::test]
    async fn close_through_the_control_sends_the_code_and_ends_the_stream() {
        let (a, mut b) = pair().await;
        let (mut io, control, _inbox) = WsIo::new(a, no_drops);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await.unwrap()
        });
        control.close(4002, "replaced");
        match b.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 4002);
                assert_eq!(frame.reason.as_str(), "replaced");
            }
            other => panic!("expected a Close, got {other:?}"),
        }
        // Our side answers; the reader then sees EOF.
        drop(b);
        assert_eq!(reader.await.unwrap(), 0);
        assert!(matches!(control.ended(), Some(Ended::Closed(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_the_stream_in_bounded_time_even_if_the_peer_reads_nothing() {
        let (a, _b) = tokio::io::duplex(4096);
        let a = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let (mut io, control, _inbox) = WsIo::new(a, no_drops);
        // The peer (`_b`) reads nothing: writes stall once the pipe is full.
        let stalled = tokio::time::timeout(
            Duration::from_secs(1),
            io.write_all(&vec![1u8; 4 * MAX_MESSAGE]),
        )
        .await;
        assert!(stalled.is_err(), "the pipe should have filled up");
        control.close(1001, "ping timeout");
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(n, 0, "EOF once the close handshake gave up");
        assert!(started.elapsed() <= CLOSE_WAIT + Duration::from_millis(10));
        assert!(matches!(control.ended(), Some(Ended::Closed(None))));
    }

    #[tokio::test]
    async fn shutdown_sends_the_configured_close() {
        let (a, mut b) = pair().await;
        let (mut io, control, _inbox) = WsIo::new(a, no_drops);
        control.close_on_shutdown(1000, "drained");
        let closer = tokio::spawn(async move { io.shutdown().await });
        match b.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1000);
                assert_eq!(frame.reason.as_str(), "drained");
            }
            other => panic!("expected a Close, got {other:?}"),
        }
        drop(b);
        closer.await.unwrap().unwrap();
        assert!(matches!(control.ended(), Some(Ended::Closed(_))));
    }

    #[tokio::test]
    async fn a_text_flood_is_dropped_and_counted_not_queued() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        fn count() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        let (a, mut b) = pair().await;
        let (mut io, _control, inbox) = WsIo::new(a, count);
        for _ in 0..CONTROL_QUEUE + 10 {
            b.send(Message::Text("{}".into())).await.unwrap();
        }
        b.send(Message::Binary(Bytes::from_static(b"x")))
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(inbox.len(), CONTROL_QUEUE);
        assert_eq!(DROPPED.load(Ordering::Relaxed), 10);
    }
    #[test]
    fn the_end_message_is_recognised_in_any_json_spelling_and_nothing_else_is() {
        assert!(is_end(END));
        assert!(is_end(r#"{ "type" : "h2:end" }"#));
        assert!(is_end(r#"{"reason":"x","type":"h2:end"}"#));
        assert!(!is_end(r#"{"type":"ping"}"#));
        assert!(!is_end(r#"{"type":"h2:endless"}"#));
        assert!(!is_end(r#"{"note":"h2:end"}"#));
        assert!(!is_end("h2:end"));
    }

    #[tokio::test]
    async fn connections_follow_one_another_on_one_socket_separated_by_their_ends() {
        let (a, b) = pair().await;
        let (relay, relay_control, _relay_inbox) = TunnelIo::new(a, no_drops);
        let (agent, agent_control, _agent_inbox) = TunnelIo::new(b, no_drops);
        assert!(relay.between_connections() && agent.between_connections());

        // The relay starts a connection; the agent sees its first bytes and starts its own.
        let mut relay_1 = relay.start_connection();
        relay_1.write_all(b"first").await.unwrap();
        relay_1.flush().await.unwrap();
        assert_eq!(agent.idle().await, Idle::Started);
        let mut agent_1 = agent.start_connection();
        agent.end_on_shutdown();
        let mut buf = [0u8; 5];
        agent_1.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        agent_1.write_all(b"reply").await.unwrap();
        agent_1.flush().await.unwrap();
        relay_1.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"reply");

        // The relay ends its half: its last bytes, then its end, which the agent reads as
        // EOF.
        relay.end_on_shutdown();
        relay_1.write_all(b"last").await.unwrap();
        relay_1.shutdown().await.unwrap();
        assert!(relay.sent_end() && !relay.between_connections());
        let mut rest = Vec::new();
        agent_1.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");

        // The agent ends its half after bytes nobody reads any more.
        agent_1.write_all(b"stale").await.unwrap();
        agent_1.shutdown().await.unwrap();
        assert!(agent.between_connections());
        assert_eq!(relay.idle().await, Idle::PeerEnded);
        assert!(relay.between_connections());

        // A second connection on the same socket: none of the first one's bytes in it.
        let mut relay_2 = relay.start_connection();
        relay_2.write_all(b"second").await.unwrap();
        relay_2.flush().await.unwrap();
        assert_eq!(agent.idle().await, Idle::Started);
        let mut agent_2 = agent.start_connection();
        let mut buf = [0u8; 6];
        agent_2.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"second");
        assert_eq!(relay_control.ended(), None);
        assert_eq!(agent_control.ended(), None);
    }

    #[tokio::test]
    async fn without_an_end_a_connection_shutdown_closes_the_tunnel() {
        let (a, mut b) = pair().await;
        let (relay, control, _inbox) = TunnelIo::new(a, no_drops);
        let mut io = relay.start_connection();
        let closer = tokio::spawn(async move { io.shutdown().await });
        match b.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1000),
            other => panic!("expected a Close, got {other:?}"),
        }
        drop(b);
        closer.await.unwrap().unwrap();
        assert!(matches!(control.ended(), Some(Ended::Closed(_))));
    }
}
