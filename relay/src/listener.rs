//! The listening socket, with a way to stop accepting that refuses new connections at
//! once without touching the ones already accepted.
//!
//! axum's graceful shutdown couples two things a drain needs apart: it stops the accept
//! loop *and* tells every connection to finish, closing at once those that have not sent
//! a request yet (a client that just connected loses its request). A drain wants new
//! connections refused (so a load balancer moves on to another machine) while the ones
//! already accepted keep being served until the very end.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::limits::ACCEPT_BACKOFF;

/// A TCP listener that stops when `stop` is cancelled: it accepts what the kernel already
/// queued (those clients completed their handshake and are about to send a request),
/// then closes the socket, so further connection attempts are refused. Accepted sockets
/// get `TCP_NODELAY`: small frames (pings, short responses) must not wait for Nagle.
pub struct StoppableListener {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    stop: CancellationToken,
    /// Connections taken from the backlog at stop time, handed out before going idle.
    drained: VecDeque<(TcpStream, SocketAddr)>,
}

impl StoppableListener {
    /// Wraps `listener`; cancelling `stop` closes it.
    ///
    /// # Errors
    /// When the listener has no local address.
    pub fn new(listener: TcpListener, stop: CancellationToken) -> io::Result<StoppableListener> {
        Ok(StoppableListener {
            addr: listener.local_addr()?,
            inner: Some(listener),
            stop,
            drained: VecDeque::new(),
        })
    }

    /// Takes every connection already queued in the backlog, then closes the socket.
    fn close(&mut self) {
        let Some(listener) = self.inner.take() else {
            return;
        };
        // Real accept(2) calls on the raw socket: tokio's readiness for it may lag behind
        // the kernel, and a connection the kernel queued must not be reset.
        let listener = match listener.into_std() {
            Ok(listener) => listener,
            Err(err) => {
                warn!(%err, "cannot take the listener back from the runtime; closing it");
                return;
            }
        };
        // Bounded: the backlog is finite, and clients whose handshake completes after the
        // socket closes are refused, which is what we want.
        for _ in 0..crate::limits::LISTEN_BACKLOG {
            match listener.accept() {
                Ok((stream, addr)) => {
                    let stream = stream
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(stream));
                    match stream {
                        Ok(stream) => self.drained.push_back((stream, addr)),
                        Err(err) => debug!(%err, "could not adopt a queued connection"),
                    }
                }
                Err(_) => break,
            }
        }
        drop(listener);
        debug!(
            queued = self.drained.len(),
            "listener closed; queued connections kept"
        );
    }
}

impl axum::serve::Listener for StoppableListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            if let Some((stream, addr)) = self.drained.pop_front() {
                return with_nodelay(stream, addr);
            }
            let Some(listener) = &self.inner else {
                // Stopped: never accept again (the server finishes its connections).
                return std::future::pending().await;
            };
            tokio::select! {
                biased;
                () = self.stop.cancelled() => self.close(),
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => return with_nodelay(stream, addr),
                    Err(err) => {
                        // Out of file descriptors and the like: back off briefly
                        // instead of spinning (as axum's own listener does), and say so
                        // at most once per interval.
                        crate::telemetry::accept_failed(&err);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

fn with_nodelay(stream: TcpStream, addr: SocketAddr) -> (TcpStream, SocketAddr) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%err, "could not set TCP_NODELAY");
    }
    (stream, addr)
}

/// The client's address, as handlers extract it (from [`crate::connections::Accepted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);
