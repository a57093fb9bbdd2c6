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
//! - **What a client WebSocket (an upgraded HTTP/1.1 connection) has read towards a
//!   message not yet whole is charged against the process's byte budget**
//!   ([`ReadCharge`]): a message may be 16 MiB, and tungstenite holds it all before the
//!   relay sees any of it, so sockets each holding part of a large message are counted
//!   with every other buffer, and one that would pass the budget is dropped.
//! - Accept errors (out of descriptors) back off briefly and are logged at most once per
//!   [`crate::limits::ERROR_LOG_INTERVAL`], with how many there were.
//!
//! axum's own `serve` offers none of these knobs; this is the same hyper-util server it
//! runs, configured.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::debug;

use crate::budget::{Budget, Held};
use crate::clients::{ConnectionPlace, PerIp};
use crate::limits::Limits;
use crate::listener::{PeerAddr, StoppableListener};
use crate::telemetry;

/// Serves `app` on every connection `listener` accepts until `finish` is cancelled; then
/// stops accepting, lets every connection finish gracefully (requests in flight complete,
/// idle ones close) and returns once they have.
pub async fn serve(
    mut listener: StoppableListener,
    app: Router,
    limits: &Limits,
    memory: &Budget,
    finish: CancellationToken,
) {
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
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(PeerAddr(addr)));
            request.extensions_mut().insert(reads.clone());
            request.extensions_mut().insert(request_place.clone());
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.oneshot(request).await.unwrap_or_else(|e| match e {})) }
        });
        let builder = builder.clone();
        let finish = finish.clone();
        let head_timeout = limits.header_read_timeout;
        let write_timeout = limits.write_timeout;
        connections.spawn(async move {
            // Held until the connection (or the tunnel or channel it became) ends: they
            // go into the socket, which an upgrade hands on (this task ends then).
            let open = Open::new(permit);
            let started = tokio::select! {
                started = first_bytes(&stream, head_timeout) => started,
                // Finishing: a connection that has not said anything yet is done.
                () = finish.cancelled() => false,
            };
            if !started {
                debug!(%addr, "connection closed: nothing (or no HTTP/2 preface) in time");
                return;
            }
            let io = TokioIo::new(ReadCharged {
                io: WriteTimeout::new(stream, write_timeout),
                charge,
                _places: (open, place),
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

/// Waits, at most `limit`, for the first bytes of a connection: enough to tell HTTP/1.1
/// from HTTP/2's 24-byte preface, which hyper-util reads with no deadline of its own (its
/// HTTP/1.1 head timeout starts after). False when they did not come or the peer left.
async fn first_bytes(stream: &TcpStream, limit: Duration) -> bool {
    const PREFACE: usize = 24;
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
/// charged against the process's byte budget. Off until [`ReadCharge::start`] (at the
/// upgrade of an HTTP/1.1 connection; plain HTTP is not charged: its bodies are, where
/// they are kept); then every read is charged, and [`ReadCharge::message_done`] (called
/// by the session for every message it receives) gives back all that was read until
/// then. What is held is at most one message being assembled and one read's worth past
/// it. A read that does not fit the budget fails the socket.
#[derive(Debug, Clone)]
pub struct ReadCharge {
    inner: Arc<ReadChargeInner>,
}

#[derive(Debug)]
struct ReadChargeInner {
    on: std::sync::atomic::AtomicBool,
    /// Held only to merge or take, never across an await.
    held: std::sync::Mutex<Held>,
    budget: Budget,
}

impl ReadCharge {
    fn new(budget: &Budget) -> ReadCharge {
        ReadCharge {
            inner: Arc::new(ReadChargeInner {
                on: std::sync::atomic::AtomicBool::new(false),
                held: std::sync::Mutex::new(Held::default()),
                budget: budget.clone(),
            }),
        }
    }

    /// Starts charging reads: the connection now carries one client WebSocket. (Not a
    /// host's tunnel: a tunnel whose read failed for want of room would fail every
    /// exchange on it, for other tenants' doing; a tunnel's messages are bounded by the
    /// frame limit, and tunnels by their tokens and the connection limits.)
    pub fn start(&self) {
        self.inner
            .on
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A message was received: what was read for it is given back. A ping or pong
    /// (`control`: its payload's length) gives back only its own frame, since it may
    /// arrive between the fragments of a data message still being assembled; a data
    /// message or a close gives back all.
    pub fn message_done(&self, control: Option<usize>) {
        match control {
            // A client's control frame: 2 bytes of header, 4 of mask, the payload.
            Some(payload) => self.held().release(payload + 6),
            None => drop(std::mem::take(&mut *self.held())),
        }
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held().bytes()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Charges `bytes` just read; false when the budget has no room.
    fn charge(&self, bytes: usize) -> bool {
        if bytes == 0 || !self.inner.on.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        match self.inner.budget.try_take_now(bytes) {
            Some(more) => {
                self.held().merge(more);
                true
            }
            None => {
                telemetry::budget_refused(crate::budget::Scope::Process);
                false
            }
        }
    }
}

/// A socket whose reads are charged by its [`ReadCharge`], holding the connection's
/// places under the connection limits for as long as it lives.
struct ReadCharged<T> {
    io: T,
    charge: ReadCharge,
    _places: (Open, ConnectionPlace),
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadCharged<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && !self.charge.charge(buf.filled().len() - before)
        {
            return Poll::Ready(Err(io::Error::other(
                "relay over its memory budget: a WebSocket message in progress was dropped",
            )));
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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
        assert!(charge.charge(50));
        assert_eq!(
            charge.held_bytes(),
            0,
            "nothing is charged before the upgrade"
        );
        charge.start();
        assert!(charge.charge(60) && charge.charge(20));
        // A ping of 4 bytes between two fragments: its own 10 bytes come back.
        charge.message_done(Some(4));
        assert_eq!((charge.held_bytes(), budget.in_use()), (70, 70));
        assert!(!charge.charge(40), "a read past the budget fails");
        charge.message_done(None);
        assert_eq!((charge.held_bytes(), budget.in_use()), (0, 0));
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
