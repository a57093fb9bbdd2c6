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
//!   (liveness and the directory heartbeat, as in v1) and `drain`.
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

/// A WebSocket as the byte stream of an HTTP/2 connection. See the module docs.
pub struct WsIo<S> {
    socket: S,
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
        });
        let (inbox, inbox_rx) = mpsc::channel(CONTROL_QUEUE);
        let io = WsIo {
            socket,
            read: Bytes::new(),
            write: BytesMut::new(),
            inbox,
            control: control.clone(),
            phase: Phase::Open,
            on_dropped,
        };
        (io, control, inbox_rx)
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
                    match Pin::new(&mut self.socket).poll_next(cx) {
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
        loop {
            if !this.read.is_empty() {
                let n = this.read.len().min(buf.remaining());
                buf.put_slice(&this.read[..n]);
                this.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut this.socket).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.finish(Ended::Gone(
                        "connection closed without a Close frame".into(),
                    ));
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(err))) if crate::websocket::is_too_big(&err) => {
                    // The peer broke the message size limit: say so (1009) and end.
                    this.control.finish(Ended::TooBig);
                    this.start_close(
                        crate::protocol::close_code::TOO_BIG,
                        "message over the size limit",
                    );
                    return this.poll_closing(cx).map(Ok);
                }
                Poll::Ready(Some(Err(err))) => {
                    // EOF for HTTP/2 (its streams fail), with the cause kept.
                    let _ = this.fail(&err);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Ok(message))) => match message.classify() {
                    WsEvent::Binary(data) => this.read = data,
                    WsEvent::Text(text) => {
                        if this.inbox.try_send(text).is_err() {
                            (this.on_dropped)();
                        }
                    }
                    WsEvent::Close(frame) => {
                        // The library queued its answer: send it, then EOF.
                        let _ = Pin::new(&mut this.socket).poll_flush(cx);
                        this.finish(Ended::PeerClosed(frame));
                        return Poll::Ready(Ok(()));
                    }
                    WsEvent::Other => {}
                },
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
        if !matches!(this.phase, Phase::Open) {
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
        if !matches!(this.phase, Phase::Open) {
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
            // HTTP/2 ends the connection (graceful shutdown done, or a protocol error it
            // already reported with GOAWAY): what it wrote last goes first.
            std::task::ready!(this.poll_send_write(cx))?;
            let (code, reason) = this
                .control
                .state()
                .on_shutdown
                .take()
                .unwrap_or((crate::protocol::close_code::NORMAL, String::new()));
            this.start_close(code, &reason);
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
}
