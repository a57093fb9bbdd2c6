//! The listening socket, with a way to stop accepting that refuses new connections at
//! once without touching the ones already accepted.
//!
//! axum's graceful shutdown couples two things a drain needs apart: it stops the accept
//! loop *and* tells every connection to finish, closing at once those that have not sent
//! a request yet (a client that just connected loses its request). A drain wants new
//! connections refused (so a load balancer moves on to another machine) while the ones
//! already accepted keep being served until the very end.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A TCP listener that stops when `stop` is cancelled: it accepts what the kernel already
/// queued (those clients completed their handshake and are about to send a request),
/// then closes the socket, so further connection attempts are refused. Accepted sockets
/// get `TCP_NODELAY`: small frames (pings, short responses) must not wait for Nagle.
pub struct StoppableListener {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    stop: CancellationToken,
    /// Connections taken from the backlog at stop time, handed out before going idle.
    drained: Vec<(TcpStream, SocketAddr)>,
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
            drained: Vec::new(),
        })
    }

    /// Takes every connection already queued in the backlog, then closes the socket.
    fn close(&mut self) {
        let Some(listener) = self.inner.take() else {
            return;
        };
        // A bounded loop: the backlog is finite, and clients whose handshake completes
        // after the socket closes are refused, which is what we want.
        for _ in 0..crate::limits::LISTEN_BACKLOG {
            match listener.try_accept() {
                Ok(conn) => self.drained.push(conn),
                Err(_) => break,
            }
        }
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
            if let Some((stream, addr)) = self.drained.pop() {
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
                        // instead of spinning (as axum's own listener does).
                        warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
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

/// `TcpListener::try_accept`: accept without waiting, for draining the backlog.
trait TryAccept {
    fn try_accept(&self) -> io::Result<(TcpStream, SocketAddr)>;
}

impl TryAccept for TcpListener {
    fn try_accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match self.poll_accept(&mut cx) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// The client's address, as handlers extract it (`ConnectInfo<PeerAddr>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, StoppableListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, StoppableListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}
