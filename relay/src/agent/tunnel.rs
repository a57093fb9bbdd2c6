//! One tunnel: connect to a relay, register, and serve it until it ends, over the
//! protocol the relay granted ([`super::v1`] or [`super::h2`]).
//!
//! Negotiation: with `--protocol auto` or `h2` the upgrade asks for the WebSocket
//! subprotocol `relay-h2`; a relay that grants it speaks `h2`. A relay that does not know
//! it answers without a subprotocol, which the WebSocket library treats as a failed
//! handshake: with `auto` the agent then asks again without it (v1), and remembers the
//! relay as v1-only for the rest of its life; with `h2` the attempt fails.
//!
//! Whatever the protocol, the same `Watchdogs` run the tunnel's life: the connect
//! (TCP + TLS + upgrade) has a deadline; an open tunnel that hears nothing for
//! `--silence-timeout` (the relay pings every 30 s) is abandoned; every close handshake
//! is bounded by [`crate::limits::agent::CLOSE_GRACE`].
//!
//! Registration: the relay refuses a registration by closing right after the upgrade, so
//! a tunnel counts as *registered* once the upgrade succeeded and it was not closed
//! within [`REGISTRATION_GRACE`] (200 ms), or as soon as a message arrives from the relay
//! (the relay only talks to registered tunnels), whichever comes first.
//!
//! After a drain notice the tunnel keeps serving (make before break) until a newer tunnel
//! of this agent is registered (and [`DRAINED_TUNNEL_LINGER`] more), then finishes: v1
//! once its in-flight work is done, `h2` by sending `GOAWAY` (the relay routes new
//! requests elsewhere, streams in flight run to their end); or when the relay closes it.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep, sleep, timeout};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::error::{ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::config::{ProtocolChoice, RelayUrl, TokenError, TokenSource};
use super::status::StatusHandle;
use super::upstream::Upstream;
use crate::host_id::HostId;
use crate::limits::agent::{DRAINED_TUNNEL_LINGER, MAX_INBOUND_MESSAGE, REGISTRATION_GRACE};
use crate::limits::{WS_READ_BUFFER, WS_WRITE_BUFFER};
use crate::protocol::h2::SUBPROTOCOL;
use crate::tunnel::Protocol;
use crate::websocket::ReadsAhead;

/// The socket of a tunnel: read ahead of its codec (see [`ReadsAhead`]).
pub(super) type Socket = tokio_tungstenite::WebSocketStream<
    tokio_tungstenite::MaybeTlsStream<tokio::io::Join<ReadsAhead<OwnedReadHalf>, OwnedWriteHalf>>,
>;

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
    /// TLS for `wss://` relays with `--ca-file`; the web roots alone without it.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Exchange and channel tasks of every tunnel, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The protocol asked for.
    pub protocol: ProtocolChoice,
    /// Relays (by URL) that granted no `h2`: asked for v1 straight away from then on.
    /// Bounded by the number of relay URLs configured. A std Mutex held for one lookup
    /// or insert, never across an await.
    pub v1_only: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Bytes of answers and local frames a v1 tunnel may hold for the relay
    /// ([`crate::limits::agent::ANSWER_BUDGET`]).
    pub answer_budget: usize,
}

/// What a tunnel tells the agent's run loop while it runs (how it ended comes back as the
/// task's result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The tunnel is registered.
    Registered {
        /// Which tunnel.
        generation: u64,
        /// What it speaks.
        protocol: Protocol,
        /// The relay serves hosts on subdomains of this domain too
        /// ([`crate::protocol::BASE_DOMAIN_HEADER`]).
        base_domain: Option<String>,
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
    /// The relay did not grant protocol `h2` (`--protocol h2`; with `auto` the agent
    /// falls back to v1 instead).
    #[error("{url} does not offer protocol h2 (use --protocol auto or v1 with it)")]
    NoSubprotocol {
        /// The tunnel URL.
        url: String,
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
    let opened = tokio::select! {
        opened = connect(&shared, &relay) => opened,
        () = cancel.cancelled() => Err(ConnectError::Cancelled),
    };
    let (Opened(socket, base_domain), protocol) = match opened {
        Ok(opened) => opened,
        Err(err) => return TunnelEnd::NotOpened(err),
    };
    debug!(relay = %relay, generation, protocol = protocol.as_str(), "tunnel open");
    let mut watchdogs =
        Watchdogs::new(&shared, generation, protocol, relay.clone(), events, newest);
    watchdogs.base_domain = base_domain;
    match protocol {
        Protocol::V1 => super::v1::serve(shared, relay, watchdogs, socket, cancel).await,
        Protocol::H2 => super::h2::serve(shared, relay, watchdogs, socket, cancel).await,
        Protocol::V2 => unreachable!("the agent asks for v1 or h2 only"),
    }
}

/// Opens the tunnel socket over the protocol the relay grants.
/// A tunnel socket just opened, and the base domain the relay said it serves hosts under.
struct Opened(Socket, Option<String>);

async fn connect(shared: &Shared, relay: &RelayUrl) -> Result<(Opened, Protocol), ConnectError> {
    let key = relay.to_string();
    let ask_h2 = match shared.protocol {
        ProtocolChoice::V1 => false,
        ProtocolChoice::H2 => true,
        ProtocolChoice::Auto => !shared
            .v1_only
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&key),
    };
    if !ask_h2 {
        return Ok((upgrade(shared, relay, false).await?, Protocol::V1));
    }
    match upgrade(shared, relay, true).await {
        Ok(socket) => Ok((socket, Protocol::H2)),
        Err(ConnectError::NoSubprotocol { .. }) if shared.protocol == ProtocolChoice::Auto => {
            info!(relay = %relay, "relay does not offer h2; using v1 with it from now on");
            shared
                .v1_only
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(key);
            Ok((upgrade(shared, relay, false).await?, Protocol::V1))
        }
        Err(err) => Err(err),
    }
}

/// Opens the tunnel socket: token, request (asking for `h2` when `h2`), and upgrade
/// under `--connect-timeout`.
async fn upgrade(shared: &Shared, relay: &RelayUrl, h2: bool) -> Result<Opened, ConnectError> {
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
    if h2 {
        request.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }

    let mut config = WebSocketConfig::default();
    // Small: the socket is read ahead of the codec, 64 KiB per system call.
    config.read_buffer_size = WS_READ_BUFFER;
    config.write_buffer_size = WS_WRITE_BUFFER;
    let max = if h2 {
        crate::limits::h2::MAX_TUNNEL_MESSAGE
    } else {
        MAX_INBOUND_MESSAGE
    };
    config.max_message_size = Some(max);
    config.max_frame_size = Some(max);
    let connector = shared.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    let attempt = async {
        let (read, write) = dial(request.uri()).await?.into_split();
        tokio_tungstenite::client_async_tls_with_config(
            request,
            tokio::io::join(ReadsAhead::new(read), write),
            Some(config),
            connector,
        )
        .await
    };
    match timeout(shared.connect_timeout, attempt).await {
        Ok(Ok((socket, response))) => {
            let base_domain = response
                .headers()
                .get(crate::protocol::BASE_DOMAIN_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok(Opened(socket, base_domain))
        }
        Ok(Err(tungstenite::Error::Http(response))) => Err(ConnectError::Http {
            url,
            status: response.status().as_u16(),
            retry_after: response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }),
        Ok(Err(tungstenite::Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(
            SubProtocolError::NoSubProtocol,
        )))) => Err(ConnectError::NoSubprotocol { url }),
        Ok(Err(err)) => Err(transport(super::error_chain(&err))),
        Err(_) => Err(ConnectError::Timeout {
            url,
            timeout: shared.connect_timeout,
        }),
    }
}

/// The TCP connection to the relay at `uri` (`ws://` or `wss://`), Nagle off: the tunnel
/// batches its own writes.
async fn dial(uri: &http::Uri) -> Result<tokio::net::TcpStream, tungstenite::Error> {
    let socket = tokio::net::TcpStream::connect(relay_addr(uri)?).await?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Host and port of the relay at `uri`: the scheme's port when it names none.
fn relay_addr(uri: &http::Uri) -> Result<(&str, u16), tungstenite::Error> {
    use tungstenite::error::UrlError;
    let host = uri
        .host()
        .ok_or(tungstenite::Error::Url(UrlError::NoHostName))?;
    // An IPv6 literal comes bracketed in a URI, and unbracketed to a resolver.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .or(match uri.scheme_str() {
            Some("wss") => Some(443),
            Some("ws") => Some(80),
            _ => None,
        })
        .ok_or(tungstenite::Error::Url(UrlError::UnsupportedUrlScheme))?;
    Ok((host, port))
}

/// Counts a unit of in-flight work (an exchange or a channel) while alive.
pub(super) struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    pub(super) fn new(counter: &Arc<watch::Sender<usize>>) -> InFlight {
        counter.send_modify(|n| *n += 1);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What every tunnel session runs by, whatever its protocol: registration, silence,
/// and the end of a drained tunnel. Owned by the tunnel's task.
pub(super) struct Watchdogs {
    shared: Arc<Shared>,
    generation: u64,
    protocol: Protocol,
    relay: RelayUrl,
    events: mpsc::UnboundedSender<Event>,
    newest: watch::Receiver<u64>,
    /// False once the run loop is gone (shutting down): stop watching `newest`.
    newest_alive: bool,
    silence: Pin<Box<Sleep>>,
    grace: Pin<Box<Sleep>>,
    /// Armed when a newer tunnel is registered; a drained tunnel finishes only after it.
    linger: Pin<Box<Sleep>>,
    lingering: bool,
    lingered: bool,
    registered_at: Option<Instant>,
    /// The relay sent `drain`.
    drained: bool,
    /// [`Alarm::Finish`] was raised.
    finishing: bool,
    /// Work in flight: a drained tunnel finishes once it is 0 (`None`: nothing to wait
    /// for).
    in_flight: Option<watch::Receiver<usize>>,
    /// What the relay said of its subdomains, passed on at registration.
    pub(super) base_domain: Option<String>,
}

/// What the `Watchdogs` ask of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alarm {
    /// Nothing heard for this long: abandon the tunnel.
    Silence(Duration),
    /// Drained, replaced (and lingered), idle: finish the tunnel.
    Finish,
}

impl Watchdogs {
    pub(super) fn new(
        shared: &Arc<Shared>,
        generation: u64,
        protocol: Protocol,
        relay: RelayUrl,
        events: mpsc::UnboundedSender<Event>,
        newest: watch::Receiver<u64>,
    ) -> Watchdogs {
        Watchdogs {
            shared: shared.clone(),
            generation,
            protocol,
            relay,
            events,
            newest,
            newest_alive: true,
            silence: Box::pin(sleep(shared.silence_timeout)),
            grace: Box::pin(sleep(REGISTRATION_GRACE)),
            linger: Box::pin(sleep(Duration::MAX)),
            lingering: false,
            lingered: false,
            registered_at: None,
            drained: false,
            finishing: false,
            in_flight: None,
            base_domain: None,
        }
    }

    /// Counts `in_flight` (exchanges plus channels still running) before finishing a
    /// drained tunnel; by default nothing is waited for.
    pub(super) fn wait_for(&mut self, in_flight: watch::Receiver<usize>) {
        self.in_flight = Some(in_flight);
    }

    /// Something arrived from the relay: the socket lives. A message the relay only
    /// sends to registered tunnels (`registers`) also proves the registration.
    pub(super) fn heard(&mut self, registers: bool) {
        self.silence
            .as_mut()
            .reset(Instant::now() + self.shared.silence_timeout);
        if registers {
            self.register();
        }
        if self.registered_at.is_some() {
            self.shared.status.heard_from_relay();
        }
    }

    /// Marks the tunnel registered (once) and tells the run loop.
    fn register(&mut self) {
        if self.registered_at.is_none() {
            self.registered_at = Some(Instant::now());
            let _ = self.events.send(Event::Registered {
                generation: self.generation,
                protocol: self.protocol,
                base_domain: self.base_domain.clone(),
            });
        }
    }

    /// The relay sent `drain`: tell the run loop (once), which opens a new tunnel.
    pub(super) fn drain(&mut self, reason: Option<String>) {
        if self.drained {
            return;
        }
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

    /// How long the tunnel has been registered, if it was.
    pub(super) fn registered_for(&self) -> Option<Duration> {
        self.registered_at.map(|at| at.elapsed())
    }

    /// Whether a newer tunnel of this agent is registered.
    fn replaced(&mut self) -> bool {
        *self.newest.borrow_and_update() > self.generation
    }

    /// Resolves with the next alarm; in between, follows the registration grace, the
    /// replacement of a drained tunnel and its linger.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits on timers and watches, and keeps its state in `self`.
    pub(super) async fn next_alarm(&mut self) -> Alarm {
        loop {
            if self.drained && !self.finishing && !self.lingering && self.replaced() {
                self.lingering = true;
                self.linger
                    .as_mut()
                    .reset(Instant::now() + DRAINED_TUNNEL_LINGER);
            }
            let idle = self
                .in_flight
                .as_mut()
                .is_none_or(|in_flight| *in_flight.borrow_and_update() == 0);
            if self.drained && !self.finishing && self.lingered && idle {
                info!(relay = %self.relay, "drained tunnel is idle and replaced; closing it");
                self.finishing = true;
                return Alarm::Finish;
            }
            let waiting = self.drained && !self.finishing;
            let counting = waiting && self.in_flight.is_some();
            tokio::select! {
                () = &mut self.silence => return Alarm::Silence(self.shared.silence_timeout),
                () = &mut self.grace, if self.registered_at.is_none() => self.register(),
                () = &mut self.linger, if self.lingering && !self.lingered => self.lingered = true,
                changed = async {
                    match self.in_flight.as_mut() {
                        Some(in_flight) => in_flight.changed().await,
                        None => std::future::pending().await,
                    }
                }, if counting => {
                    // Only fails once the session's sender is gone: nothing to wait for.
                    if changed.is_err() {
                        self.in_flight = None;
                    }
                }
                changed = self.newest.changed(), if waiting && self.newest_alive => {
                    self.newest_alive = changed.is_ok();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_relay_is_dialed_by_name_ipv4_or_bracketed_ipv6_literal() {
        for (bind, url) in [
            ("127.0.0.1:0", "ws://127.0.0.1:{port}/tunnel"),
            ("127.0.0.1:0", "ws://localhost:{port}/tunnel"),
            ("[::1]:0", "wss://[::1]:{port}/tunnel"),
        ] {
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            let port = listener.local_addr().unwrap().port().to_string();
            let uri: http::Uri = url.replace("{port}", &port).parse().unwrap();
            let socket = dial(&uri).await.unwrap();
            assert!(socket.nodelay().unwrap(), "Nagle off: {uri}");
            let (_accepted, from) = listener.accept().await.unwrap();
            assert_eq!(from, socket.local_addr().unwrap(), "{uri}");
        }
    }

    #[test]
    fn a_relay_url_without_a_port_takes_its_schemes() {
        let addr = |url: &str| {
            let uri: http::Uri = url.parse().unwrap();
            relay_addr(&uri).map(|(host, port)| (host.to_owned(), port))
        };
        assert_eq!(
            addr("ws://relay.example/t").unwrap(),
            ("relay.example".into(), 80)
        );
        assert_eq!(
            addr("wss://relay.example/t").unwrap(),
            ("relay.example".into(), 443)
        );
        assert_eq!(addr("wss://[::1]:8443/t").unwrap(), ("::1".into(), 8443));
        assert!(matches!(
            addr("/tunnel"),
            Err(tungstenite::Error::Url(
                tungstenite::error::UrlError::NoHostName
            ))
        ));
        assert!(matches!(
            addr("ftp://relay.example/t"),
            Err(tungstenite::Error::Url(
                tungstenite::error::UrlError::UnsupportedUrlScheme
            ))
        ));
    }
}
