//! One tunnel: connect to a relay, register, and serve v1 on it until it ends.
//!
//! One task owns the socket. Inside it a reader and a writer future are `select!`-ed
//! (with the tunnel's cancellation): the writer drains a bounded queue of ready JSON
//! texts, the reader dispatches each relay message and never waits on anything but the
//! socket and its timers. Exchanges and channels run as their own tasks (bounded: at most
//! [`MAX_IN_FLIGHT`] exchanges and [`MAX_CHANNELS`] channels) and queue their answers.
//!
//! Watchdogs: the connect (TCP + TLS + upgrade) has a deadline; an open tunnel that
//! hears nothing for `--silence-timeout` (the relay pings every 30 s) is abandoned; and
//! every close handshake is bounded by [`CLOSE_GRACE`].
//!
//! Registration: the relay refuses a registration by closing right after the upgrade, so
//! a tunnel counts as *registered* once the upgrade succeeded and it was not closed
//! within [`REGISTRATION_GRACE`] (200 ms), or as soon as a message arrives from the relay
//! (the relay only talks to registered tunnels), whichever comes first.
//!
//! After a drain notice the tunnel keeps serving (make before break): it closes its side
//! (1000) once its in-flight exchanges and channels are done *and* a newer tunnel of this
//! agent is registered, or when the relay closes it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::header::{AUTHORIZATION, HeaderValue};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::config::{RelayUrl, TokenError, TokenSource};
use super::status::StatusHandle;
use super::upstream::{self, ChannelCommand, ChannelIo, Upstream};
use super::wire::{self, FromRelay, Parsed, ResponseHeaders, ToRelay};
use crate::host_id::HostId;
use crate::limits::agent::{
    CHANNEL_QUEUE, CLOSE_GRACE, DRAINED_TUNNEL_LINGER, MAX_CHANNELS, MAX_IN_FLIGHT,
    MAX_INBOUND_MESSAGE, MAX_TUNNEL_MESSAGE, REGISTRATION_GRACE, TUNNEL_QUEUE,
};
use crate::limits::{MAX_CLOSE_REASON, WS_READ_BUFFER, WS_WRITE_BUFFER};
use crate::protocol::close_code;

/// Messages written to the socket before one flush: batching small messages matters under
/// load, and the cap keeps one burst from delaying a pong for long.
const MAX_BATCH: usize = 64;

/// What every tunnel of one agent shares.
#[derive(Debug)]
pub struct Shared {
    /// The hostId registered.
    pub host_id: HostId,
    /// Where the token comes from (read before every attempt).
    pub token: TokenSource,
    /// The local service.
    pub upstream: Arc<Upstream>,
    /// The operator status (tunnels record when they last heard from a relay).
    pub status: StatusHandle,
    /// See `--connect-timeout`.
    pub connect_timeout: Duration,
    /// See `--silence-timeout`.
    pub silence_timeout: Duration,
    /// Exchange and channel tasks of every tunnel, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// What a tunnel tells the agent's run loop while it runs (how it ended comes back as the
/// task's result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The tunnel is registered.
    Registered {
        /// Which tunnel.
        generation: u64,
    },
    /// The relay sent `drain`: the agent opens a new tunnel while this one finishes.
    Drain {
        /// Which tunnel.
        generation: u64,
        /// The relay's reason.
        reason: Option<String>,
    },
}

/// Why a connect attempt did not produce an open tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The token could not be read.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The relay answered the upgrade with an HTTP status.
    #[error("HTTP {status} from {url}")]
    Http {
        /// The tunnel URL (no token in it: the token travels in a header).
        url: String,
        /// The status.
        status: u16,
        /// The raw `Retry-After` header, if any.
        retry_after: Option<String>,
    },
    /// Connect + TLS + upgrade took longer than `--connect-timeout`.
    #[error("no connection to {url} within {timeout:?}")]
    Timeout {
        /// The tunnel URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// DNS, TCP, TLS or protocol failure.
    #[error("cannot connect to {url}: {reason}")]
    Transport {
        /// The tunnel URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The agent is shutting down.
    #[error("cancelled")]
    Cancelled,
}

/// Why an open tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndCause {
    /// The relay sent a Close frame.
    RelayClosed {
        /// Its code, if any.
        code: Option<u16>,
        /// Its reason text.
        reason: String,
    },
    /// Nothing arrived for `--silence-timeout`.
    Silence(Duration),
    /// The socket failed or ended without a Close frame.
    Transport(String),
    /// Drained, done with its work, and replaced by a newer tunnel: this side closed.
    Drained,
    /// The agent is shutting down.
    Shutdown,
}

impl fmt::Display for EndCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndCause::RelayClosed {
                code: Some(code),
                reason,
            } if !reason.is_empty() => {
                write!(f, "closed by the relay with {code} ({reason})")
            }
            EndCause::RelayClosed {
                code: Some(code), ..
            } => {
                write!(f, "closed by the relay with {code}")
            }
            EndCause::RelayClosed { code: None, .. } => {
                f.write_str("closed by the relay without a code")
            }
            EndCause::Silence(after) => write!(f, "nothing heard from the relay for {after:?}"),
            EndCause::Transport(why) => f.write_str(why),
            EndCause::Drained => f.write_str("drained and replaced"),
            EndCause::Shutdown => f.write_str("shut down"),
        }
    }
}

/// How one tunnel (one connect attempt) ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// It never opened.
    NotOpened(ConnectError),
    /// It opened, then ended.
    Ended {
        /// How long it had been registered (`None`: it never was).
        registered_for: Option<Duration>,
        /// Why it ended.
        cause: EndCause,
    },
}

/// Connects to `relay` and serves the tunnel until it ends.
///
/// `events` receives [`Event::Registered`] and [`Event::Drain`]; `newest` holds the
/// generation of the agent's newest registered tunnel (a drained tunnel waits for a newer
/// one before closing); `cancel` closes the tunnel with 1000.
///
/// # Cancel safety
/// Not cancel safe (it would drop the socket without a Close frame): use `cancel`.
pub async fn run(
    shared: Arc<Shared>,
    generation: u64,
    relay: RelayUrl,
    events: mpsc::UnboundedSender<Event>,
    newest: watch::Receiver<u64>,
    cancel: CancellationToken,
) -> TunnelEnd {
    let socket = tokio::select! {
        socket = connect(&shared, &relay) => socket,
        () = cancel.cancelled() => Err(ConnectError::Cancelled),
    };
    let socket = match socket {
        Ok(socket) => socket,
        Err(err) => return TunnelEnd::NotOpened(err),
    };
    debug!(relay = %relay, generation, "tunnel open");
    let session = Session::new(shared, generation, relay, events, newest);
    session.serve(socket, cancel).await
}

/// Opens the tunnel socket: token, request, and upgrade under `--connect-timeout`.
async fn connect(
    shared: &Shared,
    relay: &RelayUrl,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    ConnectError,
> {
    let url = relay.tunnel_url(&shared.host_id);
    let transport = |reason: String| ConnectError::Transport {
        url: url.clone(),
        reason,
    };
    let token = shared.token.read().await?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| transport(e.to_string()))?;
    // The header, not `token=`: query strings end up in access logs.
    let mut bearer = HeaderValue::from_bytes(&[b"Bearer ", token.expose()].concat())
        .map_err(|_| TokenError::Invalid(shared.token.to_string()))?;
    bearer.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, bearer);

    let mut config = WebSocketConfig::default();
    config.read_buffer_size = WS_READ_BUFFER;
    config.write_buffer_size = WS_WRITE_BUFFER;
    config.max_message_size = Some(MAX_INBOUND_MESSAGE);
    config.max_frame_size = Some(MAX_INBOUND_MESSAGE);
    let attempt = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match timeout(shared.connect_timeout, attempt).await {
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(tungstenite::Error::Http(response))) => Err(ConnectError::Http {
            url,
            status: response.status().as_u16(),
            retry_after: response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }),
        Ok(Err(err)) => Err(transport(super::error_chain(&err))),
        Err(_) => Err(ConnectError::Timeout {
            url,
            timeout: shared.connect_timeout,
        }),
    }
}

/// Counts a unit of in-flight work (an exchange or a channel) while alive.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(counter: &Arc<watch::Sender<usize>>) -> InFlight {
        counter.send_modify(|n| *n += 1);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The tunnel's side of one channel.
struct ChannelHandle {
    /// Client frames and close, in order; dropping it tells the channel the tunnel is gone.
    tx: mpsc::Sender<ChannelCommand>,
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

/// The reader's state of one open tunnel. Owned by the tunnel's task; nothing here is
/// shared, so nothing is locked.
struct Session {
    shared: Arc<Shared>,
    generation: u64,
    relay: RelayUrl,
    events: mpsc::UnboundedSender<Event>,
    newest: watch::Receiver<u64>,
    /// The writer's queue. The session keeps one sender, so the writer never sees it end.
    out_tx: mpsc::Sender<String>,
    out_rx: Option<mpsc::Receiver<String>>,
    /// Exchanges in flight (bounded, like the relay's pending limit).
    exchanges: Arc<Semaphore>,
    /// Open channels by id. Bounded by [`MAX_CHANNELS`]; entries whose task ended are
    /// pruned on every ping and whenever the map is full.
    channels: HashMap<String, ChannelHandle>,
    /// Exchanges plus channels still running.
    in_flight: Arc<watch::Sender<usize>>,
    /// Cancelled when the tunnel ends: its exchanges and channels stop.
    work_cancel: CancellationToken,
    registered_at: Option<Instant>,
    /// The relay sent `drain`.
    drained: bool,
}

// === impl Session ===

impl Session {
    fn new(
        shared: Arc<Shared>,
        generation: u64,
        relay: RelayUrl,
        events: mpsc::UnboundedSender<Event>,
        newest: watch::Receiver<u64>,
    ) -> Session {
        let (out_tx, out_rx) = mpsc::channel(TUNNEL_QUEUE);
        Session {
            shared,
            generation,
            relay,
            events,
            newest,
            out_tx,
            out_rx: Some(out_rx),
            exchanges: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            channels: HashMap::new(),
            in_flight: Arc::new(watch::Sender::new(0)),
            work_cancel: CancellationToken::new(),
            registered_at: None,
            drained: false,
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
        let registered_for = self.registered_at.map(|at| at.elapsed());
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
        debug!(relay = %self.relay, generation = self.generation, %cause, "tunnel closed");
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
        let silence_timeout = self.shared.silence_timeout;
        let silence = sleep(silence_timeout);
        let grace = sleep(REGISTRATION_GRACE);
        // Armed when a newer tunnel is registered; the old one closes only after it.
        let linger = sleep(Duration::MAX);
        tokio::pin!(silence, grace, linger);
        let mut lingering = false;
        let mut lingered = false;
        let mut in_flight = self.in_flight.subscribe();
        let mut newest = self.newest.clone();
        let mut newest_alive = true;
        let mut finishing = false;
        loop {
            if self.drained && !finishing && !lingering && self.replaced(&mut newest) {
                lingering = true;
                linger
                    .as_mut()
                    .reset(Instant::now() + DRAINED_TUNNEL_LINGER);
            }
            if self.drained && !finishing && lingered && *in_flight.borrow_and_update() == 0 {
                info!(relay = %self.relay, "drained tunnel is idle and replaced; closing it");
                finishing = true;
                finish.notify_one();
            }
            tokio::select! {
                message = stream.next() => {
                    silence.as_mut().reset(Instant::now() + silence_timeout);
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            self.register();
                            self.shared.status.heard_from_relay();
                            self.on_text(text.as_str());
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame
                                .map(|f| (Some(u16::from(f.code)), f.reason.as_str().to_owned()))
                                .unwrap_or_default();
                            return EndCause::RelayClosed { code, reason };
                        }
                        // v1 is text only; WebSocket pings are answered by the socket.
                        // Either still proves the relay is there.
                        Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                            if self.registered_at.is_some() {
                                self.shared.status.heard_from_relay();
                            }
                        }
                        Some(Err(err)) => return EndCause::Transport(format!("read failed: {err}")),
                        None => {
                            return EndCause::Transport("connection closed without a Close frame".into());
                        }
                    }
                }
                () = &mut silence => return EndCause::Silence(silence_timeout),
                () = &mut grace, if self.registered_at.is_none() => self.register(),
                () = &mut linger, if lingering && !lingered => lingered = true,
                changed = in_flight.changed(), if self.drained && !finishing => {
                    // The session holds the sender: this cannot fail while it runs.
                    let _ = changed;
                }
                changed = newest.changed(), if self.drained && !finishing && newest_alive => {
                    // The run loop is gone (shutting down): stop watching.
                    newest_alive = changed.is_ok();
                }
            }
        }
    }

    /// Whether a newer tunnel of this agent is registered.
    fn replaced(&self, newest: &mut watch::Receiver<u64>) -> bool {
        *newest.borrow_and_update() > self.generation
    }

    /// Marks the tunnel registered (once) and tells the run loop.
    fn register(&mut self) {
        if self.registered_at.is_none() {
            self.registered_at = Some(Instant::now());
            let _ = self.events.send(Event::Registered {
                generation: self.generation,
            });
        }
    }

    /// Queues a message the reader makes itself (pong, refusals). Never waits: when the
    /// writer is this far behind the socket is stuck, and the relay's ping timeout or our
    /// silence watchdog will replace it.
    fn send_now(&self, text: String) {
        if self.out_tx.try_send(text).is_err() {
            debug!(relay = %self.relay, "tunnel queue full; dropped a message");
        }
    }

    /// Handles one text frame. Nothing here ends the tunnel: bad input is logged and
    /// dropped.
    fn on_text(&mut self, text: &str) {
        let message = match wire::parse(text) {
            Parsed::Message(message) => message,
            Parsed::UnknownType(kind) => {
                debug!(%kind, "ignored a message of unknown type");
                return;
            }
            Parsed::Malformed(why) => {
                debug!(%why, "ignored a malformed message");
                return;
            }
        };
        match message {
            FromRelay::Ping => {
                self.send_now(ToRelay::Pong.to_json());
                self.channels.retain(|_, h| !h.tx.is_closed());
            }
            FromRelay::Http {
                id,
                method,
                path,
                headers,
                body,
            } => self.start_exchange(
                id,
                upstream::Request {
                    method,
                    path,
                    headers,
                    body,
                },
            ),
            FromRelay::WsOpen { id, path, query } => self.open_channel(id, &path, query.as_deref()),
            FromRelay::WsFrame { id, data } => {
                let Some(handle) = self.channels.get_mut(&id) else {
                    debug!(channel = %id, "frame for an unknown channel");
                    return;
                };
                match handle.tx.try_send(ChannelCommand::Frame(data)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // v1 has no flow control: one slow local socket is closed rather
                        // than stalling every stream of the tunnel.
                        warn!(channel = %id, "local WebSocket fell behind; closed it with 1013");
                        handle.kill(close_code::TRY_AGAIN_LATER);
                        self.channels.remove(&id);
                        self.send_now(
                            ToRelay::WsClose {
                                id: &id,
                                code: Some(close_code::TRY_AGAIN_LATER),
                            }
                            .to_json(),
                        );
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.channels.remove(&id);
                    }
                }
            }
            FromRelay::WsClose { id, code } => {
                if let Some(mut handle) = self.channels.remove(&id)
                    && let Err(mpsc::error::TrySendError::Full(_)) =
                        handle.tx.try_send(ChannelCommand::Close(code))
                {
                    handle.kill(code.unwrap_or(close_code::GOING_AWAY));
                }
            }
            FromRelay::Drain { reason } => {
                if !self.drained {
                    self.drained = true;
                    info!(
                        relay = %self.relay,
                        reason = reason.as_deref().unwrap_or(""),
                        "relay is draining; opening a new tunnel while this one finishes its work"
                    );
                    let _ = self.events.send(Event::Drain {
                        generation: self.generation,
                        reason,
                    });
                }
            }
        }
    }

    /// Forwards one exchange to the upstream in its own task; at most [`MAX_IN_FLIGHT`]
    /// at once, beyond which the relay gets 503 at once (it never sends that many).
    fn start_exchange(&mut self, id: String, request: upstream::Request) {
        let Ok(permit) = self.exchanges.clone().try_acquire_owned() else {
            warn!(relay = %self.relay, "{MAX_IN_FLIGHT} exchanges in flight; answered 503");
            let overloaded = upstream::Response {
                status: 503,
                headers: ResponseHeaders::default(),
                body: "agent overloaded\n".into(),
            };
            self.send_now(upstream::response_json(&id, &overloaded));
            return;
        };
        let in_flight = InFlight::new(&self.in_flight);
        let upstream = self.shared.upstream.clone();
        let out = self.out_tx.clone();
        let cancel = self.work_cancel.clone();
        self.shared.tasks.spawn(async move {
            let _permit = permit;
            let _in_flight = in_flight;
            tokio::select! {
                () = async {
                    let response = upstream.exchange(request).await;
                    // Waits while the writer is behind: backpressure.
                    let _ = out.send(upstream::response_json(&id, &response)).await;
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
                ToRelay::WsClose {
                    id: &id,
                    code: Some(close_code::TRY_AGAIN_LATER),
                }
                .to_json(),
            );
            return;
        }
        let (tx, commands) = mpsc::channel(CHANNEL_QUEUE);
        let (kill_tx, kill) = oneshot::channel();
        self.channels.insert(
            id.clone(),
            ChannelHandle {
                tx,
                kill: Some(kill_tx),
            },
        );
        let url = self.shared.upstream.url().ws_url(path, query);
        let io = ChannelIo {
            id,
            commands,
            kill,
            out: self.out_tx.clone(),
            cancel: self.work_cancel.clone(),
        };
        let in_flight = InFlight::new(&self.in_flight);
        self.shared.tasks.spawn(async move {
            let _in_flight = in_flight;
            upstream::run_channel(url, io).await;
        });
    }
}

/// Writes queued messages, in batches, until the socket fails or `finish` asks it to end
/// a drained tunnel (then it writes everything already queued first).
async fn write_loop<W>(
    sink: &mut W,
    out_rx: &mut mpsc::Receiver<String>,
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
        loop {
            while let Some(text) = next {
                debug_assert!(text.len() <= MAX_TUNNEL_MESSAGE);
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
    out_rx: &mut mpsc::Receiver<String>,
    reason: &str,
) where
    W: Sink<Message, Error = tungstenite::Error> + Unpin,
    R: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let _ = timeout(CLOSE_GRACE, async {
        out_rx.close();
        while let Ok(text) = out_rx.try_recv() {
            if sink.feed(Message::Text(text.into())).await.is_err() {
                return;
            }
        }
        let frame = CloseFrame {
            code: close_code::NORMAL.into(),
            reason: reason[..reason.len().min(MAX_CLOSE_REASON)].into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::config::UpstreamUrl;
    use serde_json::{Value, json};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    type Ws = WebSocketStream<DuplexStream>;

    /// A session over an in-memory socket; returns the relay's end of it.
    struct Harness {
        relay: Ws,
        events: mpsc::UnboundedReceiver<Event>,
        newest: watch::Sender<u64>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<TunnelEnd>,
    }

    async fn spawn_session(silence: Duration, upstream: &str) -> Harness {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let agent_side = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let relay = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let shared = Arc::new(Shared {
            host_id: HostId::parse("demo").unwrap(),
            token: TokenSource::Inline("t".parse().unwrap()),
            upstream: Arc::new(Upstream::new(UpstreamUrl::parse(upstream).unwrap())),
            status: StatusHandle::new(HostId::parse("demo").unwrap(), "ws://test"),
            connect_timeout: Duration::from_secs(1),
            silence_timeout: silence,
            tasks: TaskTracker::new(),
        });
        let (events_tx, events) = mpsc::unbounded_channel();
        let (newest, newest_rx) = watch::channel(0);
        let cancel = CancellationToken::new();
        let session = Session::new(
            shared,
            1,
            RelayUrl::parse("ws://test").unwrap(),
            events_tx,
            newest_rx,
        );
        let task = tokio::spawn(session.serve(agent_side, cancel.clone()));
        Harness {
            relay,
            events,
            newest,
            cancel,
            task,
        }
    }

    async fn next_json(relay: &mut Ws) -> Value {
        loop {
            match relay.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => {}
            }
        }
    }

    async fn send(relay: &mut Ws, v: Value) {
        relay
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn registers_after_the_grace_and_answers_pings() {
        let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
        tokio::time::sleep(REGISTRATION_GRACE / 2).await;
        assert!(h.events.try_recv().is_err(), "registered too early");
        tokio::time::sleep(REGISTRATION_GRACE).await;
        assert_eq!(
            h.events.recv().await,
            Some(Event::Registered { generation: 1 })
        );
        send(&mut h.relay, json!({"type":"ping"})).await;
        assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
        h.cancel.cancel();
        let TunnelEnd::Ended {
            cause,
            registered_for,
        } = h.task.await.unwrap()
        else {
            panic!("not opened");
        };
        assert_eq!(cause, EndCause::Shutdown);
        assert!(registered_for.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_within_the_grace_never_registers() {
        let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
        h.relay
            .send(Message::Close(Some(CloseFrame {
                code: 1008.into(),
                reason: "token expired".into(),
            })))
            .await
            .unwrap();
        let TunnelEnd::Ended {
            cause,
            registered_for,
        } = h.task.await.unwrap()
        else {
            panic!("not opened");
        };
        assert_eq!(
            cause,
            EndCause::RelayClosed {
                code: Some(1008),
                reason: "token expired".into()
            }
        );
        assert_eq!(registered_for, None);
        assert!(h.events.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn silence_abandons_the_tunnel_and_pings_keep_it_alive() {
        let silence = Duration::from_secs(75);
        let mut h = spawn_session(silence, &closed_port()).await;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            send(&mut h.relay, json!({"type":"ping"})).await;
            assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
        }
        let started = Instant::now();
        let TunnelEnd::Ended { cause, .. } = h.task.await.unwrap() else {
            panic!("not opened");
        };
        assert_eq!(cause, EndCause::Silence(silence));
        let waited = started.elapsed();
        assert!(
            waited >= silence - Duration::from_millis(10)
                && waited <= silence + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn exchanges_with_a_dead_upstream_get_502_and_the_tunnel_lives() {
        let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
        for id in ["1", "2"] {
            send(
                &mut h.relay,
                json!({"type":"http","id":id,"method":"GET","path":"/","headers":{}}),
            )
            .await;
        }
        let mut ids = Vec::new();
        for _ in 0..2 {
            let v = next_json(&mut h.relay).await;
            assert_eq!(v["type"], "http:response");
            assert_eq!(v["status"], 502);
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        ids.sort();
        assert_eq!(ids, ["1", "2"]);
        // A channel that cannot be opened is closed with 1011.
        send(
            &mut h.relay,
            json!({"type":"ws:open","id":"3","path":"/ws"}),
        )
        .await;
        assert_eq!(
            next_json(&mut h.relay).await,
            json!({"type":"ws:close","id":"3","code":1011})
        );
        // Junk is ignored.
        send(&mut h.relay, json!({"type":"future:thing"})).await;
        h.relay.send(Message::Text("{oops".into())).await.unwrap();
        send(&mut h.relay, json!({"type":"ping"})).await;
        assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
        h.cancel.cancel();
        // The agent closes with 1000.
        loop {
            match h.relay.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), 1000);
                    break;
                }
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
        assert!(matches!(
            h.task.await.unwrap(),
            TunnelEnd::Ended {
                cause: EndCause::Shutdown,
                ..
            }
        ));
    }

    /// An upstream that answers every request `done` after `delay`.
    async fn slow_upstream(delay: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
                        .await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_drained_tunnel_answers_its_in_flight_exchange_before_closing() {
        let upstream = slow_upstream(Duration::from_millis(300)).await;
        let mut h = spawn_session(Duration::from_secs(75), &upstream).await;
        send(
            &mut h.relay,
            json!({"type":"http","id":"1","method":"GET","path":"/slow","headers":{}}),
        )
        .await;
        send(&mut h.relay, json!({"type":"drain"})).await;
        // Replaced at once, but the exchange is still in flight: the answer comes first,
        // then the Close.
        h.newest.send_replace(2);
        let v = next_json(&mut h.relay).await;
        assert_eq!(
            (v["id"].as_str(), v["status"].as_u64()),
            (Some("1"), Some(200))
        );
        assert_eq!(v["body"], "done");
        match h.relay.next().await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1000),
            other => panic!("expected Close 1000, got {other:?}"),
        }
        assert!(matches!(
            h.task.await.unwrap(),
            TunnelEnd::Ended {
                cause: EndCause::Drained,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_tunnel_closes_once_idle_and_replaced() {
        let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
        send(&mut h.relay, json!({"type":"drain","reason":"deploy"})).await;
        assert_eq!(
            h.events.recv().await,
            Some(Event::Registered { generation: 1 })
        );
        assert_eq!(
            h.events.recv().await,
            Some(Event::Drain {
                generation: 1,
                reason: Some("deploy".into())
            })
        );
        // Idle, but no replacement yet: it keeps serving.
        tokio::time::sleep(Duration::from_secs(5)).await;
        send(&mut h.relay, json!({"type":"ping"})).await;
        assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
        assert!(!h.task.is_finished());
        // A newer tunnel registered: this one closes with 1000.
        h.newest.send_replace(2);
        loop {
            match h.relay.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), 1000);
                    break;
                }
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
        assert!(matches!(
            h.task.await.unwrap(),
            TunnelEnd::Ended {
                cause: EndCause::Drained,
                ..
            }
        ));
    }
}
