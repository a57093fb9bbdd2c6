//! Client connections: HTTP/1.1 and HTTP/2 on every accepted socket (tunnels arrive
//! the same way, as WebSocket upgrades), with the bounds every connection gets.
//!
//! - **A request head must arrive whole within [`Limits::header_read_timeout`]** of the
//!   connection being ready for it: a slowloris client (a byte a second) or one that
//!   connects and says nothing is closed, and so is a keep-alive connection left idle
//!   that long (hyper times the wait for the next head too).
//! - **At most [`Limits::max_connections`] connections at once** (upgraded tunnels and
//!   channels included, until they end). Over it a new connection is closed at once and
//!   counted (`relay_connections_refused_total`), rather than accepted into a process
//!   that runs out of file descriptors for Redis, peers and its own accept loop.
//! - Accept errors (out of descriptors) back off briefly and are logged at most once per
//!   [`crate::limits::ERROR_LOG_INTERVAL`], with how many there were.
//!
//! axum's own `serve` offers none of these knobs; this is the same hyper-util server it
//! runs, configured.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::debug;

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
    finish: CancellationToken,
) {
    let builder = builder(limits);
    let open = Arc::new(Semaphore::new(limits.max_connections));
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
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(PeerAddr(addr)));
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.oneshot(request).await.unwrap_or_else(|e| match e {})) }
        });
        let builder = builder.clone();
        let finish = finish.clone();
        let head_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            // Held until the connection (or the tunnel or channel it became) ends.
            let _permit = permit;
            let started = tokio::select! {
                started = first_bytes(&stream, head_timeout) => started,
                // Finishing: a connection that has not said anything yet is done.
                () = finish.cancelled() => false,
            };
            if !started {
                debug!(%addr, "connection closed: nothing (or no HTTP/2 preface) in time");
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
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
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    builder
}
