//! An `h2` tunnel, the relay's side: an HTTP/2 client of the agent, over the tunnel's
//! WebSocket ([`crate::protocol::h2`]).
//!
//! Each exchange is one HTTP/2 stream and each channel one extended CONNECT stream
//! (RFC 8441); bodies stream both ways under HTTP/2 flow control, and dropping an
//! exchange resets its stream, which the agent turns into an aborted upstream call. The
//! windows are named limits ([`crate::limits::h2`]).
//!
//! The relay drives `h2` itself rather than through hyper's HTTP/2 client: an exchange
//! opens its stream and awaits the answer from its own task, where hyper would hand the
//! request to its dispatch task and the answer back through a task it spawns per
//! request (two more task wake-ups per exchange, most of `h2`'s extra cost over v1 at one
//! request at a time). `stream` has the body and byte-stream adapters.
//!
//! The [`Session`] task owns what is not `h2`'s: liveness (v1's JSON `ping`/`pong` on
//! text messages, so the directory heartbeat works as with v1), the `drain` message,
//! closing, and the life of the HTTP/2 connection inside the tunnel: it starts one when
//! the first stream asks for it, and ends it once the tunnel has carried no stream for
//! [`Limits::h2_idle_connection`], so an idle tunnel holds none of `h2`'s buffers
//! ([`crate::protocol::h2`] has the wire side). While a connection is up, it runs
//! (reads, writes, streams) in a task of its own on the relay's tracker; while none is,
//! the session reads the WebSocket itself.
//!
//! A tunnel stops taking new streams when it is closed through a handle or when the
//! agent says `GOAWAY` (it moved to another tunnel): requests hyper had not yet written
//! come back untouched ([`ExchangeFailure::NotDelivered`]) and are routed again.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::WebSocket;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use h2::client::SendRequest;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::{
    ChannelEvent, ChannelInner, ChannelRequest, ExchangeError, ExchangeFailure, Opened, Permit,
    SessionEnd, TunnelHandle,
};
use crate::body::{Guarded, Indebted};
use crate::budget::{Charge, Debt, Reserved, TunnelBudget};
use crate::headers;
use crate::limits::{self, CLOSE_TIMEOUT, DRAIN_CLOSE_WAIT, Limits};
use crate::protocol::h2::stream::{self, RecvBody, SendError, StreamIo};
use crate::protocol::h2::{AUTHORITY, ConnectionIo, Control, Ended, Idle, TunnelIo};
use crate::protocol::v1::{Decoded, HostMessage, RelayMessage};
use crate::protocol::{DRAIN_REASON, Frame, close_code};
use crate::telemetry;

/// The handle's side of an `h2` tunnel.
#[derive(Debug)]
pub(crate) struct Link {
    /// The HTTP/2 connection inside the tunnel, as the session last set it.
    connection: watch::Sender<Connection>,
    /// Woken when a stream needs a connection and none is up.
    wanted: Notify,
    /// Streams (exchanges and channels) started so far: an idle connection is one that
    /// started none for a while.
    streams_started: AtomicU64,
    control: Arc<Control>,
    /// False once the tunnel takes no new streams (closed, or `GOAWAY` from the agent).
    accepting: AtomicBool,
    /// Pings sent since the last pong.
    unanswered_pings: AtomicU32,
    /// Whether the agent has been sent `drain`: a 4001 close is always preceded by one.
    drain_sent: AtomicBool,
    /// Largest WebSocket message on a channel.
    max_channel_message: usize,
    /// What this tunnel's HTTP/2 and channel buffers are charged against.
    budget: TunnelBudget,
    /// Where request bodies still uploading once their answer came go on being sent.
    tracker: TaskTracker,
}

/// The HTTP/2 connection inside a tunnel, as streams see it.
#[derive(Debug, Clone)]
enum Connection {
    /// None yet, or the last one ended: the session starts one when asked.
    Down,
    /// Up: new streams go on it, and what they hand it to send is charged to its debt.
    Up(SendRequest<Bytes>, Arc<Debt>),
    /// Being ended (idle): the next one starts once it has ended on both sides.
    Ending,
    /// The tunnel takes no new streams.
    Closed,
}

/// What the session needs besides the handle.
pub(crate) struct Parts {
    shared: TunnelIo<WebSocket>,
    inbox: mpsc::Receiver<String>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").finish_non_exhaustive()
    }
}

/// An `h2` tunnel over `socket`, with no HTTP/2 connection yet (the first stream starts
/// one). Its buffers are charged against `budget`.
pub(crate) fn new(
    socket: WebSocket,
    limits: &Limits,
    budget: TunnelBudget,
    tracker: &TaskTracker,
) -> (Link, Parts) {
    let (shared, control, inbox) = TunnelIo::new(socket, || {
        telemetry::message_ignored("control_overflow");
    });
    let link = Link {
        connection: watch::Sender::new(Connection::Down),
        wanted: Notify::new(),
        streams_started: AtomicU64::new(0),
        control,
        accepting: AtomicBool::new(true),
        unanswered_pings: AtomicU32::new(0),
        drain_sent: AtomicBool::new(false),
        max_channel_message: limits.max_frame_bytes,
        budget,
        tracker: tracker.clone(),
    };
    let parts = Parts {
        shared,
        inbox,
        tracker: tracker.clone(),
    };
    (link, parts)
}

/// Starts an HTTP/2 connection inside the tunnel (the client preface and settings). Its
/// receive window is reserved against the process's budget while the connection is up:
/// as much of [`limits::h2::CONNECTION_WINDOW`] as there is room for, at least
/// [`limits::h2::MIN_CONNECTION_WINDOW`].
async fn start_connection(
    shared: &TunnelIo<WebSocket>,
    tracker: &TaskTracker,
    budget: &TunnelBudget,
) -> Result<(SendRequest<Bytes>, HttpConnection, Arc<Debt>), h2::Error> {
    // Against the process's budget only: the window is a fixed share of one tunnel,
    // far inside the tunnel's own budget; what counts is how many tunnels hold one.
    let window = budget
        .try_reserve_up_to(
            limits::h2::CONNECTION_WINDOW as usize,
            limits::h2::MIN_CONNECTION_WINDOW as usize,
        )
        .unwrap_or_default();
    let granted = u32::try_from(window.bytes())
        .unwrap_or(limits::h2::CONNECTION_WINDOW)
        .max(limits::h2::MIN_CONNECTION_WINDOW);
    let debt = Arc::new(Debt::new(budget));
    let io = Paying {
        io: shared.start_connection(),
        debt: debt.clone(),
        _window: window,
    };
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(limits::h2::STREAM_WINDOW.min(granted))
        .initial_connection_window_size(granted)
        .max_frame_size(limits::h2::MAX_FRAME)
        .max_header_list_size(limits::h2::MAX_HEADER_LIST)
        .max_send_buffer_size(limits::h2::MAX_SEND_BUFFER)
        // Until the agent's SETTINGS say how many streams it takes (hyper's default).
        .initial_max_send_streams(limits::h2::INITIAL_MAX_SEND_STREAMS)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    Ok((send, tracker.spawn(conn), debt))
}

/// The byte stream of one HTTP/2 connection, paying off its [`Debt`] as the tunnel's
/// socket takes bytes, and holding the reservation of its receive window. hyper drops it
/// when the connection has ended, streams and all: then nothing is owed.
struct Paying {
    io: ConnectionIo<WebSocket>,
    debt: Arc<Debt>,
    _window: Reserved,
}

impl tokio::io::AsyncRead for Paying {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Paying {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = written {
            self.debt.paid(n);
        }
        written
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Drop for Paying {
    fn drop(&mut self) {
        self.debt.forgive();
    }
}

/// The task of an HTTP/2 connection: it ends once the connection has no stream left and
/// either no sender (this side ended it) or the agent said `GOAWAY`, or when it failed.
type HttpConnection = JoinHandle<Result<(), h2::Error>>;

/// The URI of a request inside the tunnel: HTTP/2 needs a scheme and an authority.
fn tunnel_uri(path_and_query: &str) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme("http")
        .authority(AUTHORITY)
        .path_and_query(path_and_query)
        .build()
}

impl Link {
    pub(crate) fn budget(&self) -> &TunnelBudget {
        &self.budget
    }

    pub(crate) fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && self.control.ended().is_none()
    }

    fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Relaxed);
        self.connection.send_replace(Connection::Closed);
    }

    /// A sender on the HTTP/2 connection, starting one if none is up; `None` once the
    /// tunnel takes no new streams.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn sender(&self) -> Option<(SendRequest<Bytes>, Arc<Debt>)> {
        self.streams_started.fetch_add(1, Ordering::Relaxed);
        let mut connection = self.connection.subscribe();
        loop {
            match &*connection.borrow_and_update() {
                Connection::Up(send, debt) => return Some((send.clone(), debt.clone())),
                Connection::Closed => return None,
                Connection::Down | Connection::Ending => {}
            }
            self.wanted.notify_one();
            if connection.changed().await.is_err() {
                return None;
            }
        }
    }

    pub(crate) fn drain(&self, reason: &str) -> bool {
        let drain = RelayMessage::Drain {
            reason: Some(Cow::Borrowed(reason)),
        };
        let sent = self.control.send_text(drain.to_json());
        if sent {
            self.drain_sent.store(true, Ordering::Relaxed);
        }
        sent
    }

    pub(crate) fn ping_now(&self) {
        if self.control.send_text(RelayMessage::Ping.to_json()) {
            self.unanswered_pings.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A sender on the HTTP/2 connection that may open a stream now: `None` when the
    /// connection takes no new streams (the agent said `GOAWAY`, or it failed), and then
    /// the tunnel takes none either.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn ready(&self) -> Result<Option<(SendRequest<Bytes>, Arc<Debt>)>, ExchangeError> {
        let Some((send, debt)) = self.sender().await else {
            return Ok(None);
        };
        match send.ready().await {
            Ok(send) => Ok(Some((send, debt))),
            Err(err) => {
                debug!(error = %err, "the HTTP/2 connection takes no new streams");
                self.stop_accepting();
                Ok(None)
            }
        }
    }

    /// See [`TunnelHandle::exchange`]: `timeout` bounds the wait for the response head
    /// once the request body has been sent whole; the body then streams for as long as it
    /// takes, holding `permit`.
    pub(crate) async fn exchange(
        &self,
        permit: Permit,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Body>, ExchangeFailure> {
        if !self.is_accepting() {
            return Err(ExchangeFailure::NotDelivered(Box::new(request)));
        }
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = tunnel_uri(path) else {
            return Err(ExchangeError::InvalidResponse("unusable request path".into()).into());
        };
        let (mut send, debt) = match tokio::time::timeout(timeout, self.ready()).await {
            Ok(Ok(Some(sender))) => sender,
            Ok(Ok(None)) => return Err(ExchangeFailure::NotDelivered(Box::new(request))),
            Ok(Err(err)) => return Err(err.into()),
            Err(_) => return Err(ExchangeError::Timeout.into()),
        };
        let (mut parts, body) = request.into_parts();
        parts.uri = uri;
        parts.version = Version::HTTP_2;
        // The client's framing does not cross the hop (`headers::to_host`): a body of
        // known length says so, as hyper's client would.
        if let Some(len) = http_body::Body::size_hint(&body).exact()
            && (len != 0 || !matches!(parts.method, Method::GET | Method::HEAD))
        {
            parts
                .headers
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(len));
        }
        let end = http_body::Body::is_end_stream(&body);
        let (response, stream) = send
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(|err| stream_error(&err))?;
        // What the upload hands HTTP/2 is charged until the tunnel's socket takes it.
        let mut upload =
            (!end).then(|| Box::pin(stream::send_body(stream, Indebted::new(body, debt))));
        // The deadline for the answer starts once the request body is sent whole: an
        // upload takes as long as it takes.
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline, response);
        let response = loop {
            tokio::select! {
                biased;
                response = &mut response => break response,
                sent = async { upload.as_mut().expect("polled only when set").await },
                    if upload.is_some() =>
                {
                    upload = None;
                    deadline.as_mut().reset(Instant::now() + timeout);
                    match sent {
                        Ok(()) => {}
                        Err(SendError::Body(err)) if crate::body::is_upload_too_slow(&*err) => {
                            return Err(ExchangeError::BodyTooSlow.into());
                        }
                        Err(SendError::Body(_)) => return Err(ExchangeError::BodyUnreadable.into()),
                        // The agent reset the stream (it may have answered already, and
                        // needs no more) or the connection ended: the answer says which.
                        Err(SendError::Stream(_)) => {}
                    }
                }
                () = &mut deadline, if upload.is_none() => return Err(ExchangeError::Timeout.into()),
            }
        };
        // An answer before the end of the upload (a streaming echo, an early refusal):
        // the rest of the body goes on being sent while the answer streams.
        if let Some(upload) = upload {
            self.tracker.spawn(upload);
        }
        let (mut head, body) = response.map_err(|err| stream_error(&err))?.into_parts();
        headers::from_host(&mut head.headers);
        let body = Body::new(Guarded::new(RecvBody::new(body, &head.headers), permit));
        Ok(Response::from_parts(head, body))
    }

    /// See [`TunnelHandle::open_channel`]: an extended CONNECT (RFC 8441) to the agent,
    /// which opens the local WebSocket before answering.
    pub(crate) async fn open_channel(
        &self,
        tunnel: &TunnelHandle,
        request: ChannelRequest,
        timeout: Duration,
    ) -> Result<Opened, ExchangeError> {
        if !self.is_accepting() {
            return Err(ExchangeError::TunnelClosed);
        }
        let path = match &request.query {
            Some(query) => format!("{}?{query}", request.path),
            None => request.path.clone(),
        };
        let uri = tunnel_uri(&path)
            .map_err(|_| ExchangeError::InvalidResponse("unusable channel path".into()))?;
        let mut connect = Request::new(());
        *connect.method_mut() = Method::CONNECT;
        *connect.uri_mut() = uri;
        *connect.version_mut() = Version::HTTP_2;
        *connect.headers_mut() = request.headers;
        connect.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        connect
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        let (mut send, debt) = match tokio::time::timeout(timeout, self.ready()).await {
            Ok(Ok(Some(sender))) => sender,
            Ok(Ok(None)) => return Err(ExchangeError::TunnelClosed),
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(ExchangeError::Timeout),
        };
        let (response, stream) = send
            .send_request(connect, false)
            .map_err(|err| stream_error(&err))?;
        let response = match tokio::time::timeout(timeout, response).await {
            Err(_) => return Err(ExchangeError::Timeout),
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return Err(stream_error(&err)),
        };
        let (mut head, body) = response.into_parts();
        if head.status != StatusCode::OK {
            // The local service refused the WebSocket: the client gets its answer.
            headers::from_host(&mut head.headers);
            let body = Body::new(RecvBody::new(body, &head.headers));
            return Ok(Opened::Refused(Response::from_parts(head, body)));
        }
        let protocol = head.headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(self.max_channel_message);
        config.max_frame_size = Some(self.max_channel_message);
        let io = ChannelIo {
            io: StreamIo::new(stream, body),
            budget: self.budget.clone(),
            assembling: Charge::default(),
            refused: false,
        };
        let socket = WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await;
        Ok(Opened::Channel {
            channel: super::Channel {
                tunnel: tunnel.clone(),
                inner: ChannelInner::H2(Box::new(Channel::new(socket, debt))),
            },
            protocol,
        })
    }
}

/// What a failed HTTP/2 stream means for the client: the tunnel went (the connection
/// failed or ended, or the agent refused or cancelled the stream), or the agent broke
/// the protocol.
fn stream_error(err: &h2::Error) -> ExchangeError {
    let gone = err.is_io()
        || err.is_go_away()
        || matches!(
            err.reason(),
            Some(h2::Reason::CANCEL | h2::Reason::REFUSED_STREAM)
        );
    if gone {
        ExchangeError::TunnelClosed
    } else {
        ExchangeError::InvalidResponse(format!("HTTP/2 stream failed: {err}"))
    }
}

/// The actor of one `h2` tunnel. Built by [`TunnelHandle::open`].
pub struct Session {
    handle: TunnelHandle,
    parts: Parts,
    limits: Limits,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tunnel", &self.handle.id())
            .finish_non_exhaustive()
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

    /// See [`super::Session::run`].
    pub(crate) async fn run(self, on_pong: impl Fn() + Send) -> SessionEnd {
        let Session {
            handle,
            parts:
                Parts {
                    shared,
                    mut inbox,
                    tracker,
                },
            limits,
        } = self;
        let handle = &handle;
        let link = match handle.link() {
            super::Link::H2(link) => link,
            super::Link::V1(_) | super::Link::V2(_) => {
                unreachable!("an h2 session runs an h2 tunnel")
            }
        };
        let cancel = handle.cancel_token().clone();
        let interval = limits.ping_interval;
        let mut ping = interval_at(Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let quiet_period = limits.h2_idle_connection;
        let mut quiet = interval_at(Instant::now() + quiet_period, quiet_period);
        quiet.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut idle = Quiet::default();
        let mut phase = Phase::Down;
        // The task of the connection that is up, until it ends.
        let mut conn: Option<HttpConnection> = None;
        let end = loop {
            let reading = phase.reads(&shared);
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    break close_through_handle(handle, link, &shared, &phase).await;
                }
                () = link.control.wait_ended() => break ended_by_peer(link),
                text = inbox.recv() => match text {
                    Some(text) => on_text(&text, handle, link, &on_pong),
                    // The socket is gone; its end is reported above.
                    None => {
                        link.control.wait_ended().await;
                        break ended_by_peer(link);
                    }
                },
                _ = ping.tick() => {
                    if link.unanswered_pings.fetch_add(1, Ordering::Relaxed)
                        >= limits.max_missed_pongs
                    {
                        break close_now(link, &shared, &phase, SessionEnd::PingTimeout).await;
                    }
                    link.control.send_text(RelayMessage::Ping.to_json());
                }
                result = async { conn.as_mut().expect("polled only when set").await },
                    if conn.is_some() =>
                {
                    // The connection ended, its streams with it.
                    conn = None;
                    if phase == Phase::Up {
                        // Not ours: the agent said GOAWAY (it moved to a newer tunnel)
                        // and its last stream ended, or the connection failed. Until
                        // then streams in flight went on, and new requests were routed
                        // elsewhere from the first that found it going away.
                        link.stop_accepting();
                        phase = Phase::Closing;
                        match result {
                            Ok(Ok(())) => debug!("the agent stopped taking new streams (GOAWAY)"),
                            Ok(Err(err)) => debug!(error = %err, "HTTP/2 connection failed"),
                            Err(err) => debug!(error = %err, "HTTP/2 connection task failed"),
                        }
                    }
                }
                _ = quiet.tick(), if phase == Phase::Up => {
                    if idle.is_over(handle, link) && link.is_accepting() {
                        // Nothing for a whole period: end the connection, keep the tunnel.
                        debug!("ending the idle HTTP/2 connection");
                        link.connection.send_replace(Connection::Ending);
                        shared.end_on_shutdown();
                        phase = Phase::Ending;
                        telemetry::h2_connection("ended");
                    }
                }
                () = link.wanted.notified(), if phase == Phase::Down && link.is_accepting() => {
                    let start = start_connection(&shared, &tracker, &link.budget);
                    match timeout(limits::h2::START_TIMEOUT, start).await {
                        Ok(Ok((send, dispatch, debt))) => {
                            conn = Some(dispatch);
                            link.connection.send_replace(Connection::Up(send, debt));
                            phase = Phase::Up;
                            idle = Quiet::default();
                            quiet.reset();
                            telemetry::h2_connection("started");
                        }
                        Ok(Err(err)) => {
                            debug!(error = %err, "could not start HTTP/2 in the tunnel");
                            break close_now(link, &shared, &phase, SessionEnd::HostGone(
                                format!("HTTP/2 start failed: {err}"),
                            )).await;
                        }
                        Err(_) => {
                            break close_now(link, &shared, &phase, SessionEnd::HostGone(
                                "the tunnel did not take the HTTP/2 preface".into(),
                            )).await;
                        }
                    }
                }
                () = link.control.connection_changed(), if phase != Phase::Down => {}
                seen = shared.idle(), if reading => match seen {
                    Idle::Started if phase == Phase::Down && link.is_accepting() => {
                        // The agent started the connection (to say GOAWAY): take it up.
                        link.wanted.notify_one();
                    }
                    Idle::Started => {
                        shared.discard_read();
                        telemetry::message_ignored("h2_between_connections");
                    }
                    Idle::PeerEnded | Idle::Ended => {}
                },
            }
            if phase == Phase::Closing && shared.sent_end() {
                // The agent ended the connection it said GOAWAY on (or that failed) with
                // its end rather than a Close: nothing more can cross this tunnel.
                break close_now(
                    link,
                    &shared,
                    &phase,
                    SessionEnd::Closed(close_code::NORMAL),
                )
                .await;
            }
            if phase == Phase::Ending && conn.is_none() && shared.between_connections() {
                phase = Phase::Down;
                if link.is_accepting() {
                    link.connection.send_replace(Connection::Down);
                }
            }
        };
        link.stop_accepting();
        end
    }
}

/// Where the HTTP/2 connection inside the tunnel is, as the session drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// None: the session reads the WebSocket, and starts one when a stream asks.
    Down,
    /// Up: hyper reads and writes the WebSocket.
    Up,
    /// Ending (idle): hyper writes `GOAWAY` and this side's end; then the session reads
    /// until the agent's end.
    Ending,
    /// Ending for good (the agent said `GOAWAY`, or it failed): hyper finishes the
    /// streams in flight; no new connection starts.
    Closing,
}

impl Phase {
    /// Whether the session (not hyper) reads the WebSocket now.
    fn reads(self, shared: &TunnelIo<WebSocket>) -> bool {
        match self {
            Phase::Down => true,
            Phase::Ending | Phase::Closing => shared.sent_end(),
            Phase::Up => false,
        }
    }
}

/// Whether an HTTP/2 connection has been idle for a whole period: nothing in flight at
/// two period ticks in a row, and no stream started between them.
#[derive(Debug, Default)]
struct Quiet {
    idle_at_last_tick: bool,
    started_at_last_tick: u64,
}

impl Quiet {
    fn is_over(&mut self, handle: &TunnelHandle, link: &Link) -> bool {
        let started = link.streams_started.load(Ordering::Relaxed);
        let idle = handle.pending_exchanges() == 0 && handle.open_channels() == 0;
        let over = idle && self.idle_at_last_tick && started == self.started_at_last_tick;
        self.idle_at_last_tick = idle;
        self.started_at_last_tick = started;
        over
    }
}

/// Closed through a handle: no new streams; for a drain (4001) the agent is told (if it
/// was not yet) and the streams in flight run on for at most [`DRAIN_CLOSE_WAIT`]; then
/// the Close frame.
async fn close_through_handle(
    handle: &TunnelHandle,
    link: &Link,
    shared: &TunnelIo<WebSocket>,
    phase: &Phase,
) -> SessionEnd {
    link.stop_accepting();
    let end = handle.closed_with();
    if end == SessionEnd::Closed(close_code::DRAINING) {
        // The contract: an agent always reads `drain` before a 4001 close.
        if !link.drain_sent.load(Ordering::Relaxed) {
            link.drain(DRAIN_REASON);
        }
        if timeout(DRAIN_CLOSE_WAIT, handle.idle()).await.is_err() {
            telemetry::drain_cut(handle.pending_exchanges(), handle.open_channels());
        }
    }
    close_now(link, shared, phase, end).await
}

/// Sends the Close frame for `end` and waits (bounded) for the handshake to finish:
/// hyper runs it while a connection is up, the session otherwise.
async fn close_now(
    link: &Link,
    shared: &TunnelIo<WebSocket>,
    phase: &Phase,
    end: SessionEnd,
) -> SessionEnd {
    link.stop_accepting();
    if let Some((code, reason)) = end.close_frame() {
        link.control.close(code, reason);
    }
    let handshake = async {
        loop {
            tokio::select! {
                () = link.control.wait_ended() => return,
                () = link.control.connection_changed(), if !phase.reads(shared) => {}
                _ = shared.idle(), if phase.reads(shared) => {}
            }
        }
    };
    let _ = timeout(crate::protocol::h2::CLOSE_WAIT + CLOSE_TIMEOUT, handshake).await;
    end
}

/// How the session ends when the WebSocket ended without a handle asking.
fn ended_by_peer(link: &Link) -> SessionEnd {
    match link.control.ended() {
        Some(Ended::PeerClosed(frame)) => SessionEnd::HostClosed(frame.map(|(code, _)| code)),
        Some(Ended::TooBig) => SessionEnd::TooBig,
        Some(Ended::Gone(why)) => SessionEnd::HostGone(why),
        // HTTP/2 ended the connection itself: the agent said GOAWAY (it moved, or shuts
        // down) and no stream was left, or the agent broke the protocol.
        Some(Ended::Closed(frame)) => SessionEnd::HostClosed(frame.map(|(code, _)| code)),
        None => SessionEnd::HostGone("tunnel WebSocket closed".into()),
    }
}

/// Handles one control message from the agent. Nothing here can end the tunnel: bad
/// input is counted and dropped.
fn on_text(text: &str, handle: &TunnelHandle, link: &Link, on_pong: &impl Fn()) {
    match HostMessage::parse(text) {
        Decoded::Message(HostMessage::Pong) => {
            link.unanswered_pings.store(0, Ordering::Relaxed);
            handle.record_pong();
            on_pong();
        }
        // Exchanges and channels travel as HTTP/2 on an h2 tunnel.
        Decoded::Message(_) => telemetry::message_ignored("v1_on_h2"),
        Decoded::UnknownType(_) => telemetry::message_ignored("unknown_type"),
        Decoded::Malformed { reason, .. } => {
            telemetry::message_ignored("malformed");
            debug!(%reason, "ignored a malformed control message from the agent");
        }
    }
}

/// The stream of one `h2` channel, charging what the WebSocket codec has read towards a
/// message not yet whole against the tunnel's budgets: the stream's window is given back
/// to the agent as the codec reads, so a message of up to the channel limit (16 MiB)
/// builds up here, not in HTTP/2. [`Channel::recv`] gives the charge back for every
/// message it receives. A read there is no room for fails the channel (1013).
struct ChannelIo {
    io: StreamIo,
    budget: TunnelBudget,
    assembling: Charge,
    refused: bool,
}

impl ChannelIo {
    /// A message was received: what was read for it is given back. A ping or pong
    /// (`control`: its payload's length) gives back only its own frame (2 bytes of
    /// header, unmasked from the agent), since it may arrive between the fragments of a
    /// data message.
    fn message_done(&mut self, control: Option<usize>) {
        match control {
            Some(payload) => self.assembling.release(payload + 2),
            None => self.assembling = Charge::default(),
        }
    }
}

impl tokio::io::AsyncRead for ChannelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            let read = buf.filled().len() - before;
            match self.budget.try_charge(read) {
                Ok(charge) => self.assembling.merge(charge),
                Err(_) => {
                    self.refused = true;
                    return std::task::Poll::Ready(Err(std::io::Error::other(
                        "no room in the byte budget for the channel's message",
                    )));
                }
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for ChannelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The client side of one `h2` channel: a WebSocket over the extended CONNECT stream.
pub(crate) struct Channel {
    socket: WebSocketStream<ChannelIo>,
    /// What the client's messages hand HTTP/2 is charged here until written.
    debt: Arc<Debt>,
    /// The host sent its Close (or the stream ended): only our answer is left to send.
    peer_closed: bool,
    /// The handshake is done on our side: nothing more to say.
    done: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer_closed", &self.peer_closed)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Channel {
    fn new(socket: WebSocketStream<ChannelIo>, debt: Arc<Debt>) -> Channel {
        Channel {
            socket,
            debt,
            peer_closed: false,
            done: false,
        }
    }

    /// See [`super::Channel::recv`].
    pub(crate) async fn recv(&mut self) -> ChannelEvent {
        if self.peer_closed {
            return ChannelEvent::Closed(Some(close_code::GOING_AWAY));
        }
        loop {
            let next = self.socket.next().await;
            let control = match &next {
                Some(Ok(Message::Ping(payload) | Message::Pong(payload))) => Some(payload.len()),
                _ => None,
            };
            self.socket.get_mut().message_done(control);
            match next {
                Some(Ok(Message::Text(text))) => {
                    return ChannelEvent::Frame(Frame::Text(text.as_str().to_owned()));
                }
                Some(Ok(Message::Binary(data))) => return ChannelEvent::Frame(Frame::Binary(data)),
                Some(Ok(Message::Close(frame))) => {
                    // Our answer is queued; [`Channel::close`] sends it.
                    self.peer_closed = true;
                    return ChannelEvent::Closed(frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // No room for the message the host is sending: as v1 does, the client is
                // told to try again later, and dropping the channel resets the stream.
                Some(Err(_)) if self.socket.get_ref().refused => {
                    self.peer_closed = true;
                    self.done = true;
                    return ChannelEvent::Closed(Some(close_code::TRY_AGAIN_LATER));
                }
                // The stream was reset or the tunnel went.
                Some(Err(_)) | None => {
                    self.peer_closed = true;
                    self.done = true;
                    return ChannelEvent::Closed(Some(close_code::GOING_AWAY));
                }
            }
        }
    }

    /// See [`super::Channel::send`].
    pub(crate) async fn send(&mut self, frame: Frame) -> Result<(), ExchangeError> {
        // Charged until the tunnel's socket takes it: a client writing faster than the
        // host reads waits here (its socket is not read meanwhile).
        self.debt.incur(frame.len()).await;
        let message = match frame {
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Binary(data) => Message::Binary(data),
        };
        self.socket
            .send(message)
            .await
            .map_err(|_| ExchangeError::TunnelClosed)
    }

    /// See [`super::Channel::close`]: finishes the close handshake with the host (sends
    /// the client's code, or answers the host's Close), then ends the stream cleanly, so
    /// the last frames are not lost to a reset. Bounded by [`CLOSE_TIMEOUT`].
    pub(crate) async fn close(&mut self, code: Option<u16>) {
        if self.done {
            return;
        }
        self.done = true;
        let _ = timeout(CLOSE_TIMEOUT, async {
            if !self.peer_closed {
                let frame = code
                    .filter(|c| close_code::is_sendable(*c))
                    .map(|code| CloseFrame {
                        code: code.into(),
                        reason: "".into(),
                    });
                if self.socket.send(Message::Close(frame)).await.is_err() {
                    return;
                }
                // The host's answer.
                while let Some(Ok(message)) = self.socket.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
            // Our Close (or our answer to the host's) leaves now; then our half of the
            // stream ends, and we wait for the host's (the agent ends it once its local
            // socket closes): a stream dropped half open is reset, and a reset discards
            // what was not yet written.
            let _ = self.socket.flush().await;
            let io = self.socket.get_mut();
            if io.shutdown().await.is_ok() {
                let mut rest = [0u8; 1024];
                while matches!(io.read(&mut rest).await, Ok(n) if n > 0) {}
            }
        })
        .await;
    }
}
