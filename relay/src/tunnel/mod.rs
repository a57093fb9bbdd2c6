//! Tunnels: one host's WebSocket to this relay, run by one actor task.
//!
//! A tunnel is a multiplexer of *streams*. Each stream is either an HTTP exchange (one
//! request, one response) or a WebSocket channel (frames both ways until either side
//! closes); both share one id space and one stream table, so the negotiated v2 (streamed
//! bodies, binary framing, per-stream flow control) extends this module rather than
//! replacing it.
//!
//! The socket is owned by the [`session`] task. Everything else reaches the tunnel through
//! a cloneable [`TunnelHandle`], whose only ways in are a bounded command queue and a
//! cancellation token. Dropping a handle does nothing to the tunnel: it lives as long as
//! its socket, or until it is closed through a handle.

mod session;
mod streams;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::host_id::HostId;
use crate::limits::Limits;
use crate::protocol::{Frame, Headers, StreamId, close_code};

pub use session::{Session, SessionEnd};

/// Identifies one tunnel for the life of the process (a host that reconnects gets a new
/// one), so that a tunnel that ends can tell whether it is still the registered one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelId(pub u64);

impl std::fmt::Display for TunnelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t{}", self.0)
    }
}

static NEXT_TUNNEL_ID: AtomicU64 = AtomicU64::new(1);

/// A request for the host, as v1 carries it.
#[derive(Debug)]
pub struct HttpRequest {
    /// HTTP method.
    pub method: String,
    /// Host-local path plus `?query`.
    pub path: String,
    /// Headers to forward.
    pub headers: Headers,
    /// Body text (v1 bodies are strings); empty for none.
    pub body: String,
}

/// The host's answer to an [`HttpRequest`].
#[derive(Debug)]
pub struct HttpResponse {
    /// HTTP status as the host sent it (validated by the caller).
    pub status: u16,
    /// Response headers as the host sent them.
    pub headers: Headers,
    /// Response body.
    pub body: Vec<u8>,
}

/// Why an exchange produced no response. Each variant says whose fault it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The tunnel has the maximum number of exchanges in flight (host too slow or too
    /// busy): 503.
    #[error("host overloaded: too many requests in flight")]
    Overloaded,
    /// The host did not answer in time: 504.
    #[error("host did not answer in time")]
    Timeout,
    /// The tunnel closed before the host answered: 502.
    #[error("tunnel closed before the host answered")]
    TunnelClosed,
    /// The host answered with something the relay cannot use: 502.
    #[error("host sent an invalid response: {0}")]
    InvalidResponse(String),
}

/// How an exchange ended without a response, as the session reports it.
#[derive(Debug)]
pub enum ExchangeFailure {
    /// The exchange failed; see [`ExchangeError`].
    Failed(ExchangeError),
    /// The tunnel ended before the request was written to it (replaced, drained, gone):
    /// the host never saw it, so it is handed back to be routed again.
    NotDelivered(HttpRequest),
}

impl ExchangeFailure {
    /// The error to report when the request is not routed again.
    pub fn into_error(self) -> ExchangeError {
        match self {
            ExchangeFailure::Failed(err) => err,
            ExchangeFailure::NotDelivered(_) => ExchangeError::TunnelClosed,
        }
    }
}

impl From<ExchangeError> for ExchangeFailure {
    fn from(err: ExchangeError) -> ExchangeFailure {
        ExchangeFailure::Failed(err)
    }
}

/// Something a handle asks the session to do. Processed in order.
#[derive(Debug)]
pub(crate) enum Command {
    /// Start an HTTP exchange.
    Http {
        id: StreamId,
        request: HttpRequest,
        respond: oneshot::Sender<Result<HttpResponse, ExchangeFailure>>,
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
    /// A frame from the client of a channel.
    ChannelFrame { id: StreamId, frame: Frame },
    /// The client side of a channel closed (or must be closed with this code).
    CloseChannel { id: StreamId, code: Option<u16> },
    /// The relay closed a channel on its own (slow client): tell the host. The stream is
    /// already gone from the table.
    NotifyClosed { id: StreamId, code: u16 },
    /// Tell the host to reconnect elsewhere (in-band v1 `drain`).
    Drain { reason: String },
    /// Send a ping now (besides the periodic ones).
    Ping,
}

/// The session's side of a channel: where host frames for the client go.
#[derive(Debug)]
pub(crate) struct ChannelSender {
    frames: mpsc::Sender<Frame>,
    closed: oneshot::Sender<Option<u16>>,
}

/// The client side of one WebSocket channel.
#[derive(Debug)]
pub struct Channel {
    /// The stream id of this channel.
    pub id: StreamId,
    tunnel: TunnelHandle,
    /// Frames from the host, in order. Ends (None) when the channel or tunnel ends.
    pub frames: mpsc::Receiver<Frame>,
    /// Resolves with the host's close code when the host closes the channel; errors when
    /// the tunnel went away without a word.
    pub closed: oneshot::Receiver<Option<u16>>,
}

impl Channel {
    /// Sends a client frame to the host, waiting for room in the tunnel's queue.
    ///
    /// # Errors
    /// [`ExchangeError::TunnelClosed`] when the tunnel is gone.
    pub async fn send(&self, frame: Frame) -> Result<(), ExchangeError> {
        self.tunnel
            .send(Command::ChannelFrame { id: self.id, frame })
            .await
    }

    /// Tells the host the client closed, with the client's code.
    pub async fn close(&self, code: Option<u16>) {
        let _ = self
            .tunnel
            .send(Command::CloseChannel { id: self.id, code })
            .await;
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.tunnel
            .inner
            .open_channels
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The way in to one tunnel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: TunnelId,
    host: HostId,
    connected_at: SystemTime,
    tx: mpsc::Sender<Command>,
    /// Cancelling ends the session; `close_code` says with which code.
    cancel: CancellationToken,
    close_code: AtomicU16,
    /// One permit per exchange in flight; `try_acquire` failing is the overload signal,
    /// answered at once without touching the session.
    pending: Arc<Semaphore>,
    max_pending: usize,
    next_stream: AtomicU64,
    open_channels: AtomicUsize,
    /// Whether the directory is known to name this machine for the host. False while
    /// Redis is unreachable; the reconciler sets it once the entry is written.
    synced: AtomicBool,
    /// The directory names another machine for the host (seen while draining).
    moved: AtomicBool,
    /// When the last pong arrived, in milliseconds since the Unix epoch (0: none yet).
    last_pong_ms: AtomicU64,
}

impl TunnelHandle {
    /// A new tunnel for `host`: the handle, and the session that must be run with the
    /// socket. `cancel` is the parent token (the relay's shutdown).
    pub fn new(
        host: HostId,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> (TunnelHandle, Session) {
        let (tx, rx) = mpsc::channel(limits.tunnel_queue);
        let handle = TunnelHandle {
            inner: Arc::new(Inner {
                id: TunnelId(NEXT_TUNNEL_ID.fetch_add(1, Ordering::Relaxed)),
                host,
                connected_at: SystemTime::now(),
                tx,
                cancel: cancel.child_token(),
                close_code: AtomicU16::new(close_code::DRAINING),
                pending: Arc::new(Semaphore::new(limits.max_pending)),
                max_pending: limits.max_pending,
                next_stream: AtomicU64::new(1),
                open_channels: AtomicUsize::new(0),
                synced: AtomicBool::new(false),
                moved: AtomicBool::new(false),
                last_pong_ms: AtomicU64::new(0),
            }),
        };
        let session = Session::new(handle.clone(), rx, limits.clone());
        (handle, session)
    }

    /// This tunnel's id.
    pub fn id(&self) -> TunnelId {
        self.inner.id
    }

    /// The host this tunnel serves.
    pub fn host(&self) -> &HostId {
        &self.inner.host
    }

    /// When the tunnel was registered.
    pub fn connected_at(&self) -> SystemTime {
        self.inner.connected_at
    }

    /// Exchanges in flight.
    pub fn pending_exchanges(&self) -> usize {
        self.inner.max_pending - self.inner.pending.available_permits()
    }

    /// WebSocket channels open.
    pub fn open_channels(&self) -> usize {
        self.inner.open_channels.load(Ordering::Relaxed)
    }

    /// Whether the directory is known to name this machine for the host.
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::Relaxed)
    }

    /// Records whether the directory names this machine for the host.
    pub fn set_synced(&self, synced: bool) {
        self.inner.synced.store(synced, Ordering::Relaxed);
    }

    /// Records that the directory names another machine for the host: the agent has
    /// registered a newer tunnel elsewhere. The entry is no longer this machine's to
    /// refresh or remove, so pongs and the end of this tunnel leave the directory alone.
    pub fn mark_moved(&self) {
        self.inner.moved.store(true, Ordering::Relaxed);
    }

    /// Whether [`TunnelHandle::mark_moved`] was called.
    pub fn has_moved(&self) -> bool {
        self.inner.moved.load(Ordering::Relaxed)
    }

    /// When the last pong arrived, if one did.
    pub fn last_pong(&self) -> Option<SystemTime> {
        match self.inner.last_pong_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
        }
    }

    pub(crate) fn record_pong(&self) {
        let ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.inner.last_pong_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the session has ended or been told to.
    pub fn is_closed(&self) -> bool {
        self.inner.cancel.is_cancelled() || self.inner.tx.is_closed()
    }

    /// Ends the tunnel: the session sends a Close frame with `code`, fails every pending
    /// exchange at once and closes every channel (1001).
    pub fn close(&self, code: u16) {
        self.inner.close_code.store(code, Ordering::Relaxed);
        self.inner.cancel.cancel();
    }

    /// How the session ends once closed through a handle.
    fn closed_with(&self) -> SessionEnd {
        SessionEnd::Closed(self.inner.close_code.load(Ordering::Relaxed))
    }

    /// Sends the in-band v1 `drain` message. Does not wait for room in the queue: a
    /// tunnel too backed up to take it will be closed with 4001 anyway.
    pub fn drain(&self, reason: &str) -> bool {
        self.inner
            .tx
            .try_send(Command::Drain {
                reason: reason.to_owned(),
            })
            .is_ok()
    }

    /// Sends a v1 `ping` now. Best effort: a full queue means the tunnel is busy, and the
    /// periodic ping follows anyway.
    pub fn ping_now(&self) {
        let _ = self.inner.tx.try_send(Command::Ping);
    }

    /// Carries one HTTP exchange to the host and waits for its answer, at most
    /// `timeout` in all (queueing included).
    ///
    /// # Errors
    /// See [`ExchangeError`].
    ///
    /// # Cancel safety
    /// Dropping the future abandons the exchange: the session forgets the stream and a
    /// late answer from the host is counted as an unknown id.
    pub async fn exchange(
        &self,
        request: HttpRequest,
        timeout: std::time::Duration,
    ) -> Result<HttpResponse, ExchangeError> {
        let permit = self.reserve()?;
        self.exchange_reserved(permit, request, timeout).await
    }

    /// Reserves a place for one exchange, failing at once when the tunnel is full.
    ///
    /// # Errors
    /// [`ExchangeError::Overloaded`] when `max_pending` exchanges are in flight.
    pub fn reserve(&self) -> Result<OwnedSemaphorePermit, ExchangeError> {
        self.inner
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| ExchangeError::Overloaded)
    }

    /// [`TunnelHandle::exchange`] with a place already reserved.
    ///
    /// # Errors
    /// See [`ExchangeError`].
    pub async fn exchange_reserved(
        &self,
        permit: OwnedSemaphorePermit,
        request: HttpRequest,
        timeout: std::time::Duration,
    ) -> Result<HttpResponse, ExchangeError> {
        self.try_exchange_reserved(permit, request, timeout)
            .await
            .map_err(ExchangeFailure::into_error)
    }

    /// [`TunnelHandle::exchange_reserved`], but a request the tunnel never wrote (it ended
    /// first) comes back as [`ExchangeFailure::NotDelivered`], for the caller to route
    /// again: the host cannot have acted on it.
    ///
    /// # Errors
    /// See [`ExchangeFailure`].
    pub async fn try_exchange_reserved(
        &self,
        _permit: OwnedSemaphorePermit,
        request: HttpRequest,
        timeout: std::time::Duration,
    ) -> Result<HttpResponse, ExchangeFailure> {
        let id = self.next_stream_id();
        let (respond, response) = oneshot::channel();
        let mut guard = AbandonOnDrop {
            tunnel: self,
            id,
            armed: true,
        };
        let command = Command::Http {
            id,
            request,
            respond,
        };
        let result = tokio::time::timeout(timeout, async {
            if let Err(mpsc::error::SendError(command)) = self.inner.tx.send(command).await {
                // The session is gone: the request never entered the tunnel.
                return match command {
                    Command::Http { request, .. } => Err(ExchangeFailure::NotDelivered(request)),
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
        guard.armed = matches!(result, Err(ExchangeFailure::Failed(ExchangeError::Timeout)));
        result
    }

    /// Opens a WebSocket channel to the host-local `path`.
    ///
    /// # Errors
    /// [`ExchangeError::TunnelClosed`] when the tunnel is gone.
    pub async fn open_channel(
        &self,
        path: String,
        query: Option<String>,
        queue: usize,
    ) -> Result<Channel, ExchangeError> {
        let id = self.next_stream_id();
        let (frames_tx, frames) = mpsc::channel(queue);
        let (closed_tx, closed) = oneshot::channel();
        self.send(Command::OpenChannel {
            id,
            path,
            query,
            to_client: ChannelSender {
                frames: frames_tx,
                closed: closed_tx,
            },
        })
        .await?;
        self.inner.open_channels.fetch_add(1, Ordering::Relaxed);
        Ok(Channel {
            id,
            tunnel: self.clone(),
            frames,
            closed,
        })
    }

    fn next_stream_id(&self) -> StreamId {
        StreamId(self.inner.next_stream.fetch_add(1, Ordering::Relaxed))
    }

    async fn send(&self, command: Command) -> Result<(), ExchangeError> {
        self.inner
            .tx
            .send(command)
            .await
            .map_err(|_| ExchangeError::TunnelClosed)
    }
}

/// Tells the session to forget an exchange whose client stopped waiting.
struct AbandonOnDrop<'a> {
    tunnel: &'a TunnelHandle,
    id: StreamId,
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: if the queue is full, the session's periodic prune of streams
            // whose client is gone catches it.
            let _ = self
                .tunnel
                .inner
                .tx
                .try_send(Command::Abandon { id: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use axum::extract::ws::Message;
    use futures_util::{Sink, Stream};

    use super::*;

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
        TunnelHandle::new(host, &Limits::default(), &CancellationToken::new())
    }

    fn request(path: &str) -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            path: path.into(),
            headers: Headers::default(),
            body: "payload".into(),
        }
    }

    #[tokio::test]
    async fn request_comes_back_undelivered_when_the_session_is_already_gone() {
        let (handle, session) = tunnel();
        drop(session);
        let permit = handle.reserve().unwrap();
        let failure = handle
            .try_exchange_reserved(permit, request("/orders"), Duration::from_secs(5))
            .await
            .unwrap_err();
        let ExchangeFailure::NotDelivered(back) = failure else {
            panic!("expected the request back, got {failure:?}");
        };
        assert_eq!(
            (back.path.as_str(), back.body.as_str()),
            ("/orders", "payload")
        );
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
                    .try_exchange_reserved(permit, request("/queued"), Duration::from_secs(5))
                    .await
            }
        });
        // The session is not running yet: the request waits in the tunnel's queue.
        let max = handle.inner.tx.max_capacity();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while handle.inner.tx.capacity() == max {
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
            Err(ExchangeFailure::NotDelivered(back)) => assert_eq!(back.path, "/queued"),
            other => panic!("expected the request back, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn exchange_reserved_reports_an_undelivered_request_as_tunnel_closed() {
        let (handle, session) = tunnel();
        drop(session);
        let permit = handle.reserve().unwrap();
        let err = handle
            .exchange_reserved(permit, request("/x"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, ExchangeError::TunnelClosed);
    }
}
