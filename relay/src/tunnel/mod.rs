//! Tunnels: one host's WebSocket to this relay, run by one actor task.
//!
//! A tunnel carries *exchanges* (one HTTP request, one response) and *channels* (a client
//! WebSocket carried to the host) over one of two protocols, which nothing outside this
//! module needs to know about:
//! - [`v1`]: the JSON protocol of existing agents; bodies are buffered whole;
//! - [`h2`]: HTTP/2 inside the tunnel; the relay is an HTTP/2 client of the agent, and
//!   bodies, channels, flow control and cancellation are hyper's;
//! - [`v2`]: superset's dial-back tunnels: the tunnel is a control channel, and the host
//!   dials a WebSocket back for every stream.
//!
//! Everything else reaches a tunnel through a cloneable [`TunnelHandle`], over `http`
//! types: [`TunnelHandle::exchange`] takes an `http::Request` and gives an
//! `http::Response`, [`TunnelHandle::open_channel`] gives a [`Channel`]. The handle
//! carries the tunnel's metadata (id, host, directory sync, moved, last pong, counters)
//! beside its connection (a `Link`, one variant per protocol). The socket itself is owned
//! by the tunnel's [`Session`] task. Dropping a handle does nothing to the tunnel: it
//! lives as long as its socket, or until it is closed through a handle.

pub mod h2;
pub mod v1;
pub mod v2;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ws::WebSocket;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::TunnelBudget;
use crate::host_id::HostId;
use crate::limits::Limits;
use crate::protocol::{Frame, close_code};

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

/// The protocol a tunnel speaks, negotiated at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON messages, bodies whole (`docs/protocol.md`).
    V1,
    /// HTTP/2 inside the tunnel (subprotocol `relay-h2`).
    H2,
    /// Superset's dial-back tunnels (`/v2/control`).
    V2,
}

impl Protocol {
    /// `"v1"`, `"h2"` or `"v2"`, as `/admin/tunnels` and the metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V1 => "v1",
            Protocol::H2 => "h2",
            Protocol::V2 => "v2",
        }
    }
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
    /// Client: the request body is over the limit (v1 buffers it whole): 413.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Client: the body is within the body limit, but its v1 message (the body escaped as
    /// JSON: a control character takes 6 bytes) would be over the host's message limit,
    /// which would end the whole tunnel: 413, and nothing is sent.
    #[error(
        "request body too large once encoded for the host: its message would be over {limit} bytes"
    )]
    BodyTooLargeEncoded {
        /// The message limit.
        limit: usize,
    },
    /// Client: v1 tunnels carry text bodies only: 415.
    #[error("request body is not UTF-8 text; v1 tunnels carry text bodies only")]
    BodyNotText,
    /// Client: the body could not be read (the client went away mid-upload): 400.
    #[error("could not read the request body")]
    BodyUnreadable,
    /// Client: the body arrived slower than the minimum upload rate
    /// ([`crate::limits::MIN_UPLOAD_RATE`]): 408.
    #[error("request body sent too slowly")]
    BodyTooSlow,
    /// The tunnel carries its maximum of WebSocket channels
    /// ([`crate::limits::MAX_CHANNELS`]): 503.
    #[error("host has too many open WebSocket channels")]
    TooManyChannels,
    /// Relay: holding this request or its answer would pass a byte budget (the host's
    /// share, or the whole relay's; see [`crate::budget`]): 503, try again.
    #[error("relay busy: no room to buffer this exchange ({} budget full)", .0.as_str())]
    OverBudget(crate::budget::Scope),
}

/// How an exchange ended without a response, as the tunnel reports it.
#[derive(Debug)]
pub enum ExchangeFailure {
    /// The exchange failed; see [`ExchangeError`].
    Failed(ExchangeError),
    /// The tunnel ended (replaced, drained, gone) or stopped taking new streams before
    /// the request was written to it: the host never saw it, so it is handed back, body
    /// untouched, to be routed again.
    NotDelivered(Box<Request<Body>>),
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

/// A place for one exchange on a tunnel ([`TunnelHandle::reserve`]). The exchange holds
/// it until it ends: with `h2`, until the last byte of the response body.
#[derive(Debug)]
pub struct Permit {
    _held: OwnedSemaphorePermit,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The host sent a Close frame (with this code, if any).
    HostClosed(Option<u16>),
    /// The socket ended or failed without a Close frame.
    HostGone(String),
    /// Too many pings went unanswered.
    PingTimeout,
    /// The host sent a message over the frame limit.
    TooBig,
    /// Closed through a handle (replaced, drain, shutdown) with this code.
    Closed(u16),
    /// The host sent something its protocol does not allow (v2's control channel).
    BadMessage(&'static str),
}

impl SessionEnd {
    /// The code and reason of the relay's Close frame, when the relay is the one closing.
    pub(crate) fn close_frame(&self) -> Option<(u16, &'static str)> {
        match self {
            SessionEnd::HostClosed(_) | SessionEnd::HostGone(_) => None,
            SessionEnd::PingTimeout => Some((close_code::GOING_AWAY, "ping timeout")),
            SessionEnd::TooBig => Some((close_code::TOO_BIG, "message over the frame limit")),
            SessionEnd::Closed(code) => Some((*code, close_reason(*code))),
            SessionEnd::BadMessage(why) => Some((close_code::POLICY, why)),
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SessionEnd::HostClosed(_) => "host_closed",
            SessionEnd::HostGone(_) => "host_gone",
            SessionEnd::PingTimeout => "ping_timeout",
            SessionEnd::TooBig => "frame_too_big",
            SessionEnd::Closed(close_code::REPLACED) => "replaced",
            SessionEnd::Closed(close_code::DRAINING) => "draining",
            SessionEnd::Closed(_) => "closed",
            SessionEnd::BadMessage(_) => "bad_message",
        }
    }
}

/// The reason text of a Close the relay sends through a handle.
pub(crate) fn close_reason(code: u16) -> &'static str {
    match code {
        close_code::REPLACED => "replaced by a newer tunnel for this host",
        close_code::DRAINING => "relay draining, reconnect now",
        _ => "closed by the relay",
    }
}

/// The way in to one tunnel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    id: TunnelId,
    host: HostId,
    protocol: Protocol,
    connected_at: SystemTime,
    /// Cancelling ends the session; `close_code` says with which code.
    cancel: CancellationToken,
    close_code: AtomicU16,
    /// One permit per exchange in flight; `try_acquire` failing is the overload signal,
    /// answered at once without touching the session.
    pending: Arc<Semaphore>,
    max_pending: usize,
    open_channels: AtomicUsize,
    max_channels: usize,
    /// Woken when the last channel closes (a draining `h2` tunnel waits for it).
    channels_closed: Notify,
    /// Whether the directory is known to name this machine for the host. False while
    /// Redis is unreachable; the reconciler sets it once the entry is written.
    synced: AtomicBool,
    /// The directory names another machine for the host (seen while draining).
    moved: AtomicBool,
    /// When the last pong arrived, in milliseconds since the Unix epoch (0: none yet).
    last_pong_ms: AtomicU64,
    /// The connection, per protocol.
    link: Link,
}

/// A tunnel's connection, per protocol.
#[derive(Debug)]
pub(crate) enum Link {
    V1(v1::Link),
    H2(h2::Link),
    V2(v2::Link),
}

/// The actor of one tunnel: run it until the tunnel ends ([`Session::run`]).
// Short-lived: `run` takes it apart at once and boxes each protocol's future.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Session {
    /// A v1 tunnel and its socket.
    V1(v1::Session, WebSocket),
    /// An `h2` tunnel (its socket is shared with hyper's connection).
    H2(h2::Session),
    /// A v2 tunnel: its control channel.
    V2(v2::Session),
}

impl Session {
    /// Runs the tunnel until the host goes, a ping times out, or a handle closes it; then
    /// fails what is in flight and closes the socket. `on_pong` is called for every pong
    /// (directory heartbeat). `on_message` is told of every WebSocket message a v1
    /// tunnel receives (with the payload length of a ping or pong), so that what was read
    /// for it can be given back ([`crate::connections::ReadCharge::message_done`]).
    ///
    /// # Cancel safety
    /// Not cancel safe: close through the handle instead.
    pub async fn run(
        self,
        on_pong: impl Fn() + Send,
        on_message: impl Fn(Option<usize>) + Send,
    ) -> SessionEnd {
        // Each protocol's future is boxed: a task's size is its largest future, and an
        // idle v1 tunnel must not pay for h2's (nor h2 for v1's).
        match self {
            Session::V1(session, socket) => {
                let socket = socket.inspect(move |message| {
                    if let Ok(message) = message {
                        on_message(crate::websocket::control_len(message));
                    }
                });
                Box::pin(session.run(socket, on_pong)).await
            }
            Session::H2(session) => Box::pin(session.run(on_pong)).await,
            Session::V2(session) => Box::pin(session.run(on_pong)).await,
        }
    }
}

// === impl TunnelHandle ===

impl TunnelHandle {
    fn with_link(
        host: HostId,
        protocol: Protocol,
        limits: &Limits,
        cancel: &CancellationToken,
        link: Link,
    ) -> TunnelHandle {
        TunnelHandle {
            inner: Arc::new(Inner {
                id: TunnelId(NEXT_TUNNEL_ID.fetch_add(1, Ordering::Relaxed)),
                host,
                protocol,
                connected_at: SystemTime::now(),
                cancel: cancel.child_token(),
                close_code: AtomicU16::new(close_code::DRAINING),
                pending: Arc::new(Semaphore::new(limits.max_pending)),
                max_pending: limits.max_pending,
                open_channels: AtomicUsize::new(0),
                max_channels: limits.max_channels,
                channels_closed: Notify::new(),
                synced: AtomicBool::new(false),
                moved: AtomicBool::new(false),
                last_pong_ms: AtomicU64::new(0),
                link,
            }),
        }
    }

    /// A new tunnel for `host` over `socket` speaking `protocol`: the handle, and the
    /// session that must be run. Its buffers are charged against `budget` (its own, its
    /// tenant's and the process's). `cancel` is the parent token (the relay's shutdown);
    /// tasks the tunnel spawns (`h2` connections and streams) are tracked by `tracker`.
    /// An `h2` tunnel starts its HTTP/2 connection on its first stream. A v2 tunnel's
    /// dials are waited for in `place`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        host: HostId,
        protocol: Protocol,
        socket: WebSocket,
        limits: &Limits,
        budget: TunnelBudget,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
        place: &v2::Place,
    ) -> (TunnelHandle, Session) {
        match protocol {
            Protocol::V1 => {
                let (handle, session) = TunnelHandle::new_v1(host, limits, budget, cancel);
                (handle, Session::V1(session, socket))
            }
            Protocol::H2 => {
                let (link, parts) = h2::new(socket, limits, budget, tracker);
                let handle =
                    TunnelHandle::with_link(host, Protocol::H2, limits, cancel, Link::H2(link));
                let session = h2::Session::new(handle.clone(), parts, limits.clone());
                (handle, Session::H2(session))
            }
            Protocol::V2 => {
                let (link, parts) = v2::new(&host, socket, limits, budget, tracker, place, cancel);
                let handle =
                    TunnelHandle::with_link(host, Protocol::V2, limits, cancel, Link::V2(link));
                let session = v2::Session::new(handle.clone(), parts, limits.clone());
                (handle, Session::V2(session))
            }
        }
    }

    /// A new v1 tunnel for `host`: the handle, and the session to run with the socket.
    /// Its buffers are charged against `budget`.
    pub fn new_v1(
        host: HostId,
        limits: &Limits,
        budget: TunnelBudget,
        cancel: &CancellationToken,
    ) -> (TunnelHandle, v1::Session) {
        let (link, rx) = v1::Link::new(limits, budget);
        let handle = TunnelHandle::with_link(host, Protocol::V1, limits, cancel, Link::V1(link));
        let session = v1::Session::new(handle.clone(), rx, limits.clone());
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

    /// The protocol this tunnel speaks.
    pub fn protocol(&self) -> Protocol {
        self.inner.protocol
    }

    /// What this tunnel's buffers are charged against ([`crate::budget`]).
    pub fn budget(&self) -> &TunnelBudget {
        match &self.inner.link {
            Link::V1(link) => link.budget(),
            Link::H2(link) => link.budget(),
            Link::V2(link) => link.budget(),
        }
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
            ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub(crate) fn record_pong(&self) {
        let ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.inner.last_pong_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the tunnel has ended, been told to, or takes no new work.
    pub fn is_closed(&self) -> bool {
        self.inner.cancel.is_cancelled()
            || match &self.inner.link {
                Link::V1(link) => link.is_closed(),
                Link::H2(link) => !link.is_accepting(),
                Link::V2(link) => link.is_closed(),
            }
    }

    /// Ends the tunnel with `code`. In flight: a v1 tunnel fails its exchanges at once
    /// and closes its channels (1001); an `h2` tunnel closed with 4001 (drain) lets its
    /// streams run on for a bounded time first. Either way no new work is taken.
    pub fn close(&self, code: u16) {
        self.inner.close_code.store(code, Ordering::Relaxed);
        self.inner.cancel.cancel();
    }

    /// How the session ends once closed through a handle.
    pub(crate) fn closed_with(&self) -> SessionEnd {
        SessionEnd::Closed(self.inner.close_code.load(Ordering::Relaxed))
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    pub(crate) fn link(&self) -> &Link {
        &self.inner.link
    }

    /// Sends the in-band `drain` message. Does not wait for room: a tunnel too backed
    /// up to take it will be closed with 4001 anyway. False when it could not be sent, or
    /// the protocol has none ([`TunnelHandle::hears_drain`]).
    pub fn drain(&self, reason: &str) -> bool {
        match &self.inner.link {
            Link::V1(link) => link.drain(reason),
            Link::H2(link) => link.drain(reason),
            Link::V2(_) => false,
        }
    }

    /// Whether the host can be told to move (the `drain` message) and keep this tunnel
    /// for its work in flight meanwhile. Superset's v2 hosts cannot: closing the control
    /// channel is what moves them (their streams are sockets of their own and run on).
    pub fn hears_drain(&self) -> bool {
        !matches!(self.inner.link, Link::V2(_))
    }

    /// Sends a `ping` now. Best effort: a full queue means the tunnel is busy, and the
    /// periodic ping follows anyway.
    pub fn ping_now(&self) {
        match &self.inner.link {
            Link::V1(link) => link.ping_now(),
            Link::H2(link) => link.ping_now(),
            // A v2 host pings; the relay only answers.
            Link::V2(_) => {}
        }
    }

    /// Reserves a place for one exchange, failing at once when the tunnel is full.
    ///
    /// # Errors
    /// [`ExchangeError::Overloaded`] when `max_pending` exchanges are in flight.
    pub fn reserve(&self) -> Result<Permit, ExchangeError> {
        self.inner
            .pending
            .clone()
            .try_acquire_owned()
            .map(|held| Permit { _held: held })
            .map_err(|_| ExchangeError::Overloaded)
    }

    /// Carries one HTTP exchange to the host: `request` has the host-local path as its
    /// URI (`/path?query`) and the headers the host gets. Waits at most `timeout` for the
    /// response head (v1: for the whole response). A request the tunnel never wrote (it
    /// ended or stopped taking streams first) comes back as
    /// [`ExchangeFailure::NotDelivered`], for the caller to route again.
    ///
    /// # Errors
    /// See [`ExchangeFailure`].
    ///
    /// # Cancel safety
    /// Dropping the future abandons the exchange: v1 forgets the stream (a late answer is
    /// counted as an unknown id); `h2` resets it, and the agent aborts the upstream call.
    pub async fn exchange(
        &self,
        permit: Permit,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Body>, ExchangeFailure> {
        match &self.inner.link {
            Link::V1(link) => link.exchange(self, permit, request, timeout).await,
            Link::H2(link) => link.exchange(permit, request, timeout).await,
            Link::V2(link) => link.exchange(permit, request, timeout).await,
        }
    }

    /// Opens a WebSocket channel to the host-local path of `request`, carrying its
    /// headers (the subprotocols the client offers among them). `h2` waits for the host's
    /// answer: a refusal comes back as the host's HTTP response. v1 has no answer to wait
    /// for: a channel the host cannot open is closed (1011) right after.
    ///
    /// # Errors
    /// [`ExchangeError::TunnelClosed`] when the tunnel is gone, [`ExchangeError::Timeout`]
    /// when an `h2` host does not answer within `timeout`.
    pub async fn open_channel(
        &self,
        request: ChannelRequest,
        timeout: Duration,
    ) -> Result<Opened, ExchangeError> {
        // Counted before it is opened, so channels opening at once cannot pass the cap
        // together; given back if it does not open.
        if self.inner.open_channels.fetch_add(1, Ordering::Relaxed) >= self.inner.max_channels {
            self.channel_closed();
            return Err(ExchangeError::TooManyChannels);
        }
        let opened = match &self.inner.link {
            Link::V1(link) => link.open_channel(self, request).await,
            Link::H2(link) => link.open_channel(self, request, timeout).await,
            Link::V2(link) => link.open_channel(self, request).await,
        };
        if !matches!(opened, Ok(Opened::Channel { .. })) {
            self.channel_closed();
        }
        opened
    }

    /// Resolves once no exchange is in flight and no channel is open. Only for a tunnel
    /// that is closing: while it waits, permits released go to it, so no new exchange
    /// can start.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn idle(&self) {
        let all = u32::try_from(self.inner.max_pending).unwrap_or(u32::MAX);
        // Holding every permit means no exchange is in flight (and none can start).
        let _all = self.inner.pending.acquire_many(all).await;
        loop {
            let closed = self.inner.channels_closed.notified();
            if self.open_channels() == 0 {
                return;
            }
            closed.await;
        }
    }

    fn channel_closed(&self) {
        if self.inner.open_channels.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.inner.channels_closed.notify_waiters();
        }
    }
}

/// What a client asked of a channel.
#[derive(Debug)]
pub struct ChannelRequest {
    /// Host-local path, without the query.
    pub path: String,
    /// Query string without the leading `?`, the relay's own `token` removed.
    pub query: Option<String>,
    /// The headers the host gets (see [`crate::headers::to_host`]).
    pub headers: HeaderMap,
}

/// The host's answer to a channel request.
#[derive(Debug)]
pub enum Opened {
    /// The channel is open.
    Channel {
        /// The channel.
        channel: Channel,
        /// The subprotocol the host chose, for the client's handshake.
        protocol: Option<HeaderValue>,
    },
    /// The host refused the WebSocket (its local service answered this instead).
    Refused(Response<Body>),
}

/// One event of a channel, from the host's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    /// A frame for the client.
    Frame(Frame),
    /// The host closed the channel (with this code); or, with 1001, the tunnel went.
    Closed(Option<u16>),
}

/// The client side of one WebSocket channel.
#[derive(Debug)]
pub struct Channel {
    tunnel: TunnelHandle,
    inner: ChannelInner,
}

#[derive(Debug)]
enum ChannelInner {
    V1(v1::Channel),
    /// Boxed: a WebSocket codec is much larger than a v1 channel's queues.
    H2(Box<h2::Channel>),
    /// The host's dial socket.
    V2(v2::Channel),
}

impl Channel {
    /// The next event from the host.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is only taken when it is returned.
    pub async fn recv(&mut self) -> ChannelEvent {
        match &mut self.inner {
            ChannelInner::V1(channel) => channel.recv().await,
            ChannelInner::H2(channel) => channel.recv().await,
            ChannelInner::V2(channel) => channel.recv().await,
        }
    }

    /// Sends a client frame to the host, waiting for room (backpressure).
    ///
    /// # Errors
    /// [`ExchangeError::TunnelClosed`] when the channel or tunnel is gone.
    pub async fn send(&mut self, frame: Frame) -> Result<(), ExchangeError> {
        match &mut self.inner {
            ChannelInner::V1(channel) => channel.send(frame).await,
            ChannelInner::H2(channel) => channel.send(frame).await,
            ChannelInner::V2(channel) => channel.send(frame).await,
        }
    }

    /// Tells the host the client closed, with the client's code.
    pub async fn close(&mut self, code: Option<u16>) {
        match &mut self.inner {
            ChannelInner::V1(channel) => channel.close(code).await,
            ChannelInner::H2(channel) => channel.close(code).await,
            ChannelInner::V2(channel) => channel.close(code).await,
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.tunnel.channel_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_exchanges_and_channels() {
        let (handle, _session) = TunnelHandle::new_v1(
            HostId::parse("web-1").unwrap(),
            &Limits::default(),
            crate::budget::TunnelBudget::alone(usize::MAX, &crate::budget::Budget::new(usize::MAX)),
            &CancellationToken::new(),
        );
        let permit = handle.reserve().unwrap();
        handle.inner.open_channels.fetch_add(1, Ordering::Relaxed);
        let idle = tokio::spawn({
            let handle = handle.clone();
            async move { handle.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        drop(permit);
        tokio::task::yield_now().await;
        assert!(!idle.is_finished(), "a channel is still open");
        handle.channel_closed();
        tokio::time::timeout(Duration::from_secs(5), idle)
            .await
            .expect("idle once nothing is in flight")
            .unwrap();
    }
}
