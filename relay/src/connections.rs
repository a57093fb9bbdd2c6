//! Client connections: HTTP/1.1 and HTTP/2 on every accepted socket (tunnels arrive
//! the same way, as WebSocket upgrades), with the bounds every connection gets.
//!
//! - **A request head must arrive whole within [`Limits::header_read_timeout`]** of the
//!   connection being ready for it: a slowloris client (a byte a second) or one that
//!   connects and says nothing is closed, and so is a keep-alive connection left idle
//!   that long (hyper times the wait for the next head too). An HTTP/2 connection gets a
//!   PING every as long instead, and is closed when one goes unanswered as long.
//! - **At most [`Limits::max_connections`] connections at once** (upgraded tunnels and
//!   channels included, until they end). Over it a new connection is closed at once and
//!   counted (`relay_connections_refused_total`), rather than accepted into a process
//!   that runs out of file descriptors for Redis, peers and its own accept loop.
//! - **A write that makes no progress for [`Limits::write_timeout`] drops the
//!   connection** ([`WriteTimeout`]): a client that stops reading a response, a client
//!   WebSocket that stops reading its channel, a host that stops reading its tunnel.
//!   Upgraded connections keep the bound, since the upgrade hands over this same socket.
//! - **At most [`Limits::max_connections_per_ip`] of them from one client address**
//!   (when the relay sees clients' own addresses, see [`crate::clients`]); over it a new
//!   connection from that address is closed at once, and the others are served.
//! - **What a client WebSocket (an upgraded HTTP/1.1 connection; an HTTP/2 stream is
//!   charged alike, in [`crate::client_socket`]) or a v1 tunnel has read towards a
//!   message not yet whole is charged against the byte budgets**
//!   ([`ReadCharge`]): a message may be 16 MiB, and tungstenite holds it all before the
//!   relay sees any of it, so sockets each holding part of a large message are counted
//!   with every other buffer. A client's that would pass the budget is dropped; a
//!   tunnel's waits for room.
//! - Accept errors (out of descriptors) back off briefly and are logged at most once per
//!   [`crate::limits::ERROR_LOG_INTERVAL`], with how many there were.
//!
//! axum's own `serve` offers none of these knobs; this is the same hyper-util server it
//! runs, configured.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::FromRequestParts;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::body::Indebted;
use crate::budget::{Budget, Debt, Held, Reserved, TunnelBudget};
use crate::clients::{ConnectionPlace, PerIp};
use crate::limits::{self, Limits};
use crate::listener::{PeerAddr, StoppableListener};
use crate::telemetry;
use crate::tls::Tls;
use crate::websocket::ReadAhead;

/// What a request knows of the connection it arrived on, as one request extension.
/// Five extensions (address, TLS, read charge, connection place, send debt) cost a
/// map entry, an allocation and a hash each on every request, and made the map grow
/// once more: about 3 % of the relay's instructions per proxied request.
#[derive(Debug, Clone)]
pub struct Accepted(Arc<AcceptedOn>);

#[derive(Debug)]
struct AcceptedOn {
    peer: SocketAddr,
    secure: bool,
    reads: ReadCharge,
    place: ConnectionPlace,
    sent: SendDebt,
}

impl Accepted {
    /// The request's `Accepted`, if it came through [`serve`].
    pub fn of(extensions: &http::Extensions) -> Option<&Accepted> {
        extensions.get::<Accepted>()
    }

    /// The client's (or peer relay's) address.
    pub fn peer(&self) -> SocketAddr {
        self.0.peer
    }

    /// The relay terminated TLS on the connection.
    pub fn secure(&self) -> bool {
        self.0.secure
    }

    /// What the connection's reads are charged to.
    pub fn reads(&self) -> &ReadCharge {
        &self.0.reads
    }

    /// The connection's places under the connection limits.
    pub fn place(&self) -> &ConnectionPlace {
        &self.0.place
    }

    /// What the connection owes for the response bytes it has not yet written.
    pub fn sent(&self) -> &SendDebt {
        &self.0.sent
    }
}

/// Handlers extract the client's address from [`Accepted`].
impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = http::StatusCode;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Accepted::of(&parts.extensions)
            .map(|accepted| PeerAddr(accepted.peer()))
            .ok_or(http::StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// Serves `app` (the answer to each request: [`crate::router::App::serve`]) on every
/// connection `listener` accepts until `finish` is cancelled; then stops accepting, lets
/// every connection finish gracefully (requests in flight complete, idle ones close) and
/// returns once they have.
pub async fn serve<A, F>(
    mut listener: StoppableListener,
    app: A,
    limits: &Limits,
    memory: &Budget,
    tls: Option<Tls>,
    finish: CancellationToken,
) where
    A: Fn(axum::extract::Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = axum::response::Response> + Send + 'static,
{
    let builder = builder(limits);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = PerIp::new(limits.max_connections_per_ip);
    let connections = TaskTracker::new();
    loop {
        let (stream, addr) = tokio::select! {
            biased;
            () = finish.cancelled() => break,
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        debug!("connection {addr} accepted");
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            // Full: closing at once tells the client (and a load balancer) to go
            // elsewhere, and frees the descriptor.
            telemetry::connection_refused("limit");
            debug!(%addr, "connection refused: at the connection limit");
            drop(stream);
            continue;
        };
        let Some(ip_slot) = per_ip.try_take(crate::clients::peer_ip(addr)) else {
            telemetry::connection_refused("per_ip_limit");
            debug!(%addr, "connection refused: its address holds its limit of connections");
            drop(stream);
            continue;
        };
        let app = app.clone();
        let charge = ReadCharge::new(memory);
        let reads = charge.clone();
        let place = ConnectionPlace::new(ip_slot);
        let request_place = place.clone();
        let sent = SendDebt(Arc::new(Debt::new(&TunnelBudget::process_only(memory))));
        let request_sent = sent.clone();
        let accepted = Accepted(Arc::new(AcceptedOn {
            peer: addr,
            secure: tls.is_some(),
            reads,
            place: request_place,
            sent: request_sent.clone(),
        }));
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(accepted.clone());
            let http2 = request.version() == http::Version::HTTP_2;
            let sent = request_sent.clone();
            let app = app.clone();
            async move {
                let response = app(request.map(axum::body::Body::new)).await;
                Ok::<_, Infallible>(if http2 {
                    sent.charge_body(response)
                } else {
                    response
                })
            }
        });
        let builder = builder.clone();
        let finish = finish.clone();
        let head_timeout = limits.header_read_timeout;
        let write_timeout = limits.write_timeout;
        let acceptor = tls.as_ref().map(|tls| tls.acceptor().clone());
        connections.spawn(async move {
            // Held until the connection (or the tunnel or channel it became) ends: they
            // go into the socket, which an upgrade hands on (this task ends then).
            let open = Open::new(permit);
            let started = tokio::select! {
                started = start(stream, acceptor, head_timeout, write_timeout) => started,
                // Finishing: a connection that has not said anything yet is done.
                () = finish.cancelled() => None,
            };
            let Some((socket, ahead)) = started else {
                debug!(%addr, "connection closed: no TLS handshake, or nothing (or no HTTP/2 preface), in time");
                return;
            };
            let io = TokioIo::new(ReadCharged {
                io: socket,
                ahead: ReadAhead::with(ahead),
                charge,
                waiting: None,
                sent: Some(sent),
                _places: Some((open, place)),
            });
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = finish.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                // A client that went away, a bad request, a head that took too long.
                debug!(%addr, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A connection's place under the limit, counted in `relay_connections_open` while held.
struct Open {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Open {
    fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Open {
        telemetry::connection_open(1.0);
        Open { _permit: permit }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        telemetry::connection_open(-1.0);
    }
}

/// An accepted connection's socket: plain, or TLS over it.
type Socket = Either<WriteTimeout<TcpStream>, Box<TlsStream<WriteTimeout<TcpStream>>>>;

/// Makes an accepted connection ready to serve within `limit`: its TLS handshake, if
/// any, and its first bytes ([`first_bytes`]), which a TLS connection has read already
/// (returned to be read again). `None` when that did not happen in time.
async fn start(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    limit: Duration,
    write_timeout: Duration,
) -> Option<(Socket, bytes::BytesMut)> {
    let Some(acceptor) = tls else {
        return first_bytes(&stream, limit).await.then(|| {
            (
                Either::Left(WriteTimeout::new(stream, write_timeout)),
                bytes::BytesMut::new(),
            )
        });
    };
    let deadline = Instant::now() + limit;
    let handshake = acceptor.accept(WriteTimeout::new(stream, write_timeout));
    let mut tls = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(err)) => {
            // Not TLS, an unknown name, a client that does not trust the certificate.
            debug!(error = %err, "TLS handshake failed");
            return None;
        }
        Err(_) => return None,
    };
    let mut ahead = bytes::BytesMut::with_capacity(PREFACE);
    let first = async {
        use tokio::io::AsyncReadExt;
        loop {
            match tls.read_buf(&mut ahead).await {
                Ok(0) | Err(_) => return false,
                Ok(_) if ahead[0] != b'P' || ahead.len() >= PREFACE => return true,
                Ok(_) => {}
            }
        }
    };
    matches!(tokio::time::timeout_at(deadline, first).await, Ok(true))
        .then(|| (Either::Right(tls), ahead))
}

/// The length of HTTP/2's connection preface.
const PREFACE: usize = 24;

/// Waits, at most `limit`, for the first bytes of a connection: enough to tell HTTP/1.1
/// from HTTP/2's 24-byte preface, which hyper-util reads with no deadline of its own (its
/// HTTP/1.1 head timeout starts after). False when they did not come or the peer left.
async fn first_bytes(stream: &TcpStream, limit: Duration) -> bool {
    let arrived = tokio::time::timeout(limit, async {
        let mut buf = [0u8; PREFACE];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if buf[0] != b'P' || n >= PREFACE => return true,
                // Part of what may be a preface: peeking does not consume, so wait a
                // little before looking again rather than spin.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    arrived.unwrap_or(false)
}

/// hyper-util's server (HTTP/1.1, or HTTP/2 with prior knowledge) with its timer, so the
/// head timeout applies.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // An HTTP/2 connection has no head to time: a PING every head-timeout interval,
    // unanswered within as long, closes one whose peer vanished or holds it silently.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout)
        .enable_connect_protocol();
    builder
}

/// What one connection's socket has read towards a WebSocket message not yet whole,
/// charged against the byte budgets. Off until the connection is upgraded (plain HTTP is
/// not charged: its bodies are, where they are kept); then [`ReadCharge::message_done`]
/// (called by the session for every message it receives) gives back all that was read
/// for the message. What is held is at most one message being assembled and one read's
/// worth past it. Two ways, after who the peer is:
/// - a client WebSocket ([`ReadCharge::start`]): every read is charged against the
///   process's budget, and a read that does not fit fails the socket;
/// - a v1 tunnel ([`ReadCharge::start_tunnel`]): the first
///   [`crate::limits::TUNNEL_READ_ALLOWANCE`] of a message are free (most v1 messages are
///   smaller: they flow as they always did), the rest is reserved from the tenant's and
///   the process's budgets (not the tunnel's own: one message at a time is bounded by
///   the frame limit, and a tunnel whose own budget is full refuses the answer (503)
///   once it is whole, as before). A read that does not fit is not lost, but the next
///   waits for room: a tunnel is slowed down for want of memory, never ended by it. (An `h2` tunnel's
///   messages are at most [`crate::limits::h2::MAX_TUNNEL_MESSAGE`]: not charged.)
#[derive(Debug, Clone)]
pub struct ReadCharge {
    inner: Arc<ReadChargeInner>,
}

#[derive(Debug)]
struct ReadChargeInner {
    /// Held only for a few field updates, never across an await.
    state: std::sync::Mutex<ReadState>,
    budget: Budget,
    /// The socket carries a tunnel: read ahead ([`crate::limits::TUNNEL_READ_AHEAD`]).
    read_ahead: std::sync::atomic::AtomicBool,
    /// Charging has started: until then a read costs no lock (plain HTTP never does).
    on: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
enum ReadState {
    #[default]
    Off,
    Client(Held),
    Tunnel(TunnelReads),
}

/// A v1 tunnel's reads towards the message it is assembling.
#[derive(Debug)]
struct TunnelReads {
    budget: TunnelBudget,
    /// Read since the last message ended.
    read: usize,
    /// Reserved for them (what is past the allowance).
    held: Reserved,
    /// Past the allowance, not yet charged: the next read waits for it.
    owing: usize,
    /// Messages received so far: what is owed for one that has ended is no longer due.
    messages: u64,
}

/// What a read left to pay.
enum Due {
    Nothing,
    /// Client: no room; the socket fails.
    Refused,
    /// Tunnel: no room for `bytes` of message `message` now; wait for it.
    Owing {
        budget: TunnelBudget,
        bytes: usize,
        message: u64,
    },
}

impl ReadCharge {
    /// Not charging yet; charges against `budget` once started.
    pub(crate) fn new(budget: &Budget) -> ReadCharge {
        ReadCharge {
            inner: Arc::new(ReadChargeInner {
                state: std::sync::Mutex::new(ReadState::Off),
                budget: budget.clone(),
                read_ahead: std::sync::atomic::AtomicBool::new(false),
                on: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The socket now carries a tunnel: reads take up to
    /// [`crate::limits::TUNNEL_READ_AHEAD`] from it at once, handed to the codec as it
    /// asks, instead of the codec's small read buffer's worth per system call.
    pub fn read_ahead(&self) {
        self.inner
            .read_ahead
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn reads_ahead(&self) -> bool {
        self.inner
            .read_ahead
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts charging reads: the connection now carries one client WebSocket.
    pub fn start(&self) {
        *self.state() = ReadState::Client(Held::default());
        self.inner
            .on
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Starts charging reads past the allowance against `budget`: the connection now
    /// carries a v1 tunnel.
    pub fn start_tunnel(&self, budget: &TunnelBudget) {
        *self.state() = ReadState::Tunnel(TunnelReads {
            budget: budget.clone(),
            read: 0,
            held: Reserved::default(),
            owing: 0,
            messages: 0,
        });
        self.inner
            .on
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A message was received: what was read for it is given back. A ping or pong
    /// (`control`: its payload's length) gives back only its own frame, since it may
    /// arrive between the fragments of a data message still being assembled; a data
    /// message or a close gives back all.
    pub fn message_done(&self, control: Option<usize>) {
        // A peer's control frame: 2 bytes of header, 4 of mask, the payload.
        let frame = control.map(|payload| payload + 6);
        match &mut *self.state() {
            ReadState::Off => {}
            ReadState::Client(held) => match frame {
                Some(bytes) => held.release(bytes),
                None => *held = Held::default(),
            },
            ReadState::Tunnel(reads) => match frame {
                Some(bytes) => {
                    reads.read = reads.read.saturating_sub(bytes);
                    let due = reads
                        .read
                        .saturating_sub(limits::TUNNEL_READ_ALLOWANCE)
                        .min(reads.budget.most_shared());
                    let over = reads.held.bytes().saturating_sub(due);
                    reads.held.release(over);
                    reads.owing = reads.owing.min(due.saturating_sub(reads.held.bytes()));
                }
                None => {
                    reads.read = 0;
                    reads.held = Reserved::default();
                    reads.owing = 0;
                    reads.messages += 1;
                }
            },
        }
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        match &*self.state() {
            ReadState::Off => 0,
            ReadState::Client(held) => held.bytes(),
            ReadState::Tunnel(reads) => reads.held.bytes(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Charges `bytes` just read.
    fn charge(&self, bytes: usize) -> Due {
        if bytes == 0 || !self.inner.on.load(std::sync::atomic::Ordering::Acquire) {
            return Due::Nothing;
        }
        match &mut *self.state() {
            ReadState::Off => Due::Nothing,
            ReadState::Client(held) => match self.inner.budget.try_take_now(bytes) {
                Some(more) => {
                    held.merge(more);
                    Due::Nothing
                }
                None => {
                    telemetry::budget_refused(crate::budget::Scope::Process);
                    Due::Refused
                }
            },
            ReadState::Tunnel(reads) => {
                reads.read += bytes;
                // A message larger than a whole budget is charged the whole budget, no
                // more: it could never fit otherwise (and the tunnel would wait for ever).
                let due = reads
                    .read
                    .saturating_sub(limits::TUNNEL_READ_ALLOWANCE)
                    .min(reads.budget.most_shared());
                let more = due.saturating_sub(reads.held.bytes() + reads.owing);
                if more == 0 {
                    return Due::Nothing;
                }
                match reads.budget.try_reserve(more) {
                    Ok(charge) => {
                        reads.held.merge(charge);
                        Due::Nothing
                    }
                    Err(_) => {
                        reads.owing += more;
                        Due::Owing {
                            budget: reads.budget.clone(),
                            bytes: more,
                            message: reads.messages,
                        }
                    }
                }
            }
        }
    }

    /// Whether the socket still owes for message `message` (it has not ended).
    fn still_owes(&self, message: u64) -> bool {
        matches!(&*self.state(), ReadState::Tunnel(reads) if reads.messages == message && reads.owing > 0)
    }

    /// A reservation waited for came through.
    fn settle(&self, charge: Reserved, bytes: usize, message: u64) {
        if let ReadState::Tunnel(reads) = &mut *self.state()
            && reads.messages == message
        {
            reads.owing = reads.owing.saturating_sub(bytes);
            reads.held.merge(charge);
        }
    }
}

/// A tunnel's read waiting for room in its budgets: message, bytes, and the charge.
type Waiting = (u64, usize, Pin<Box<dyn Future<Output = Reserved> + Send>>);

/// A socket (or a stream) whose reads are charged by its [`ReadCharge`]; an accepted
/// socket also holds the connection's places under the connection limits for as long as
/// it lives.
pub struct ReadCharged<T> {
    io: T,
    /// Read from the socket ahead of the codec (a tunnel's); empty, with no memory, when
    /// the codec has taken it all.
    ahead: ReadAhead,
    charge: ReadCharge,
    waiting: Option<Waiting>,
    /// Paid as the socket takes bytes (an accepted connection's).
    sent: Option<SendDebt>,
    _places: Option<(Open, ConnectionPlace)>,
}

impl<T> ReadCharged<T> {
    /// `io`, its reads charged by `charge`.
    pub(crate) fn new(io: T, charge: &ReadCharge) -> ReadCharged<T> {
        ReadCharged {
            io,
            ahead: ReadAhead::default(),
            charge: charge.clone(),
            waiting: None,
            sent: None,
            _places: None,
        }
    }

    fn paid(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let (Poll::Ready(Ok(n)), Some(sent)) = (&written, &self.sent) {
            sent.0.paid(*n);
        }
        written
    }
}

impl<T> Drop for ReadCharged<T> {
    fn drop(&mut self) {
        if let Some(sent) = &self.sent {
            sent.0.forgive();
        }
    }
}

/// What the responses of one HTTP/2 client connection have handed hyper to send and its
/// socket has not taken yet, charged against the process's budget: an HTTP/2 connection
/// carries many streams, each with a send buffer of its own (hyper's: 400 KiB), which a
/// client that grants large windows and stops reading would fill on every stream at once.
/// A response body of more than [`limits::UNCHARGED_RESPONSE`] waits for room instead. (An
/// HTTP/1.1 connection writes one response at a time through one buffer.)
#[derive(Debug, Clone)]
pub struct SendDebt(Arc<Debt>);

impl SendDebt {
    /// `response`, its body charged as it is handed over.
    fn charge_body(&self, response: axum::response::Response) -> axum::response::Response {
        let small = http_body::Body::size_hint(response.body())
            .upper()
            .is_some_and(|n| n <= limits::UNCHARGED_RESPONSE);
        if small {
            return response;
        }
        let debt = self.0.clone();
        response.map(|body| axum::body::Body::new(Indebted::new(body, debt)))
    }

    /// The debt itself, for what is sent on the connection outside a response (a
    /// WebSocket over one of its streams).
    pub fn debt(&self) -> &Arc<Debt> {
        &self.0
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadCharged<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((message, bytes, waiting)) = &mut this.waiting {
            // What is owed for a message that has ended since is not waited for.
            if this.charge.still_owes(*message) {
                let charge = std::task::ready!(waiting.as_mut().poll(cx));
                this.charge.settle(charge, *bytes, *message);
            }
            this.waiting = None;
        }
        let before = buf.filled().len();
        // Bytes read before the connection was served (a TLS connection's first ones)
        // are handed out first, whoever reads.
        let polled = if this.charge.reads_ahead() || !this.ahead.is_empty() {
            this.ahead.poll_read(&mut this.io, cx, buf)
        } else {
            Pin::new(&mut this.io).poll_read(cx, buf)
        };
        if let Poll::Ready(Ok(())) = polled {
            match self.charge.charge(buf.filled().len() - before) {
                Due::Nothing => {}
                Due::Refused => {
                    return Poll::Ready(Err(io::Error::other(
                        "relay over its memory budget: a WebSocket message in progress was dropped",
                    )));
                }
                Due::Owing {
                    budget,
                    bytes,
                    message,
                } => {
                    let waiting = Box::pin(async move { budget.reserve(bytes).await });
                    self.waiting = Some((message, bytes, waiting));
                }
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadCharged<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.paid(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.paid(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A socket whose writes fail with [`io::ErrorKind::TimedOut`] once one has been waiting
/// (the peer's receive window and our send buffer full) for `limit` without a byte
/// going out. Reads are untouched: waiting for a peer to speak is bounded elsewhere
/// (head timeout, pings), and is not a stall.
#[derive(Debug)]
pub struct WriteTimeout<T> {
    io: T,
    limit: Duration,
    /// When the write now waiting started waiting; `None` while writes go through.
    stalled_since: Option<Instant>,
    /// Wakes the task at the deadline. Allocated on the first stall and reset after:
    /// a busy connection stalls for a moment at every full send buffer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteTimeout<T> {
    /// `io` with writes bounded by `limit`.
    pub fn new(io: T, limit: Duration) -> Self {
        WriteTimeout {
            io,
            limit,
            stalled_since: None,
            timer: None,
        }
    }

    /// Passes on what a write returned, or an error once it has waited too long.
    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled_since = None;
            return polled;
        }
        let now = Instant::now();
        let deadline = *self.stalled_since.get_or_insert(now) + self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                telemetry::write_timed_out();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    WriteTimedOut(self.limit),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The error inside the [`io::Error`] of a [`WriteTimeout`] (to tell it from others).
#[derive(Debug, thiserror::Error)]
#[error("the peer took no bytes for {0:?} (write timeout)")]
pub struct WriteTimedOut(Duration);

/// Whether `err`, or an error it wraps, is a [`WriteTimeout`]'s.
pub fn is_write_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<WriteTimedOut>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<WriteTimedOut>())
        {
            return true;
        }
        current = err.source();
    }
    false
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.guard(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.guard(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.guard(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_read_charge_holds_what_was_read_until_a_data_message_and_a_ping_gives_back_its_frame() {
        let budget = Budget::new(100);
        let charge = ReadCharge::new(&budget);
        assert!(matches!(charge.charge(50), Due::Nothing));
        assert_eq!(
            charge.held_bytes(),
            0,
            "nothing is charged before the upgrade"
        );
        charge.start();
        assert!(matches!(charge.charge(60), Due::Nothing));
        assert!(matches!(charge.charge(20), Due::Nothing));
        // A ping of 4 bytes between two fragments: its own 10 bytes come back.
        charge.message_done(Some(4));
        assert_eq!((charge.held_bytes(), budget.in_use()), (70, 70));
        assert!(
            matches!(charge.charge(40), Due::Refused),
            "a client's read past the budget fails"
        );
        charge.message_done(None);
        assert_eq!((charge.held_bytes(), budget.in_use()), (0, 0));
    }

    #[tokio::test]
    async fn a_tunnel_read_is_free_up_to_the_allowance_then_reserved_and_past_the_budget_owed() {
        const FREE: usize = limits::TUNNEL_READ_ALLOWANCE;
        let process = Budget::new(2 * FREE);
        let _others = process.try_take_now(FREE).unwrap();
        let tunnel = TunnelBudget::alone(10 * FREE, &process);
        let charge = ReadCharge::new(&process);
        charge.start_tunnel(&tunnel);
        assert!(matches!(charge.charge(FREE), Due::Nothing));
        assert_eq!(charge.held_bytes(), 0, "within the allowance");
        assert!(matches!(charge.charge(FREE / 2), Due::Nothing));
        // Reserved from the tenant's and process's budgets, not the tunnel's own.
        assert_eq!(
            (charge.held_bytes(), process.in_use(), tunnel.in_use()),
            (FREE / 2, FREE + FREE / 2, 0)
        );
        // The process has FREE / 2 left: a read of FREE is owed, not refused.
        let Due::Owing {
            budget,
            bytes,
            message,
        } = charge.charge(FREE)
        else {
            panic!("a tunnel's read past the budget is owed");
        };
        assert_eq!((bytes, message), (FREE, 0));
        assert!(charge.still_owes(0));
        let waiting = tokio::spawn(async move { budget.reserve(bytes).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no room yet");
        // The message ends (its bytes were all read): what it held comes back, and what
        // it owed is no longer due.
        charge.message_done(None);
        assert!(!charge.still_owes(0));
        let late = waiting.await.unwrap();
        charge.settle(late, bytes, message);
        assert_eq!((charge.held_bytes(), process.in_use()), (0, FREE));
    }

    /// A reader that counts the reads it serves.
    struct Counted {
        io: tokio::io::DuplexStream,
        reads: usize,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let polled = Pin::new(&mut self.io).poll_read(cx, buf);
            if polled.is_ready() {
                self.reads += 1;
            }
            polled
        }
    }

    #[tokio::test]
    async fn a_tunnel_socket_is_read_64_kib_at_a_time_and_holds_no_buffer_while_idle() {
        let (ours, mut theirs) = tokio::io::duplex(256 * 1024);
        let charge = ReadCharge::new(&Budget::new(usize::MAX));
        charge.read_ahead();
        let mut socket = ReadCharged::new(Counted { io: ours, reads: 0 }, &charge);
        theirs.write_all(&[7u8; 128 * 1024]).await.unwrap();
        // The codec asks 4 KiB at a time, as the relay's does.
        let mut got = 0;
        while got < 128 * 1024 {
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(chunk[..n].iter().all(|b| *b == 7));
            got += n;
        }
        assert_eq!(
            socket.io.reads, 3,
            "128 KiB in three reads of the socket (4 KiB straight into the codec's buffer, \
             then 64 KiB ahead), not 32"
        );
        // Nothing left to read: the wait holds no buffer.
        let mut chunk = [0u8; 4096];
        let pending = tokio::time::timeout(Duration::from_millis(20), socket.read(&mut chunk));
        assert!(pending.await.is_err());
        assert_eq!(socket.ahead.capacity(), 0);
    }

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut ours = WriteTimeout::new(ours, Duration::from_millis(50));
        let started = Instant::now();
        let err = ours.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(is_write_timeout(&err), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        // Nothing was lost on the way: the peer can still read what went out.
        let mut buf = [0u8; 1024];
        assert_eq!(theirs.read(&mut buf).await.unwrap(), 1024);
    }

    #[tokio::test]
    async fn a_peer_that_keeps_reading_slowly_is_never_cut() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = WriteTimeout::new(ours, Duration::from_millis(100));
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0u8; 64];
            while total < 64 * 20 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                total += theirs.read(&mut buf).await.unwrap();
            }
            total
        });
        // 20 reads 30 ms apart: 600 ms in all, far past the limit, each stall under it.
        ours.write_all(&[1u8; 64 * 20]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 64 * 20);
    }
}
