//! A test front door: a small TCP balancer in front of several relays, standing
//! in for a platform's load balancer (Fly's proxy, a Kubernetes Service) during
//! a rolling restart.
//!
//! [`FrontDoor::spawn`] listens on `127.0.0.1:0`. For each inbound connection it
//! picks the next backend round-robin among those that accept a TCP connect
//! (a refused or timed-out connect moves on to the next one), then pipes bytes
//! both ways until either side closes. It knows nothing of HTTP or WebSocket,
//! so it neither retries nor hides anything a relay does: what a client sees is
//! what the relay it landed on answered.
//!
//! It records which backend each inbound connection went to, keyed by the
//! client's address ([`FrontDoor::backend_of`]), so a test can name the relay a
//! failed request landed on, and how the piping ended
//! ([`FrontDoor::connection_end`]: bytes each way, and the error if a side
//! failed, such as a reset from a backend that never accepted the connection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Bound on one backend connect. A backend that is down refuses at once on
/// loopback; this only matters for one that is wedged.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// State shared between the accept loop, the connection tasks and the test.
struct Shared {
    backends: Vec<SocketAddr>,
    /// Round-robin position: the next connection starts its search here.
    next: AtomicUsize,
    /// Inbound peer address → where its connection was piped and how that
    /// ended. A std mutex: held for one insert, update or lookup, never
    /// across an await. Entries are kept (a peer address is only reused after
    /// its socket closed, and a later connection overwrites it).
    routes: Mutex<HashMap<SocketAddr, Piped>>,
    /// Backend connects that failed (refused or timed out).
    refused: AtomicUsize,
    /// Inbound connections dropped because no backend accepted.
    unrouted: AtomicUsize,
    /// Inbound connections piped to a backend.
    routed: AtomicUsize,
}

/// One inbound connection piped to a backend.
#[derive(Debug, Clone)]
struct Piped {
    backend: SocketAddr,
    /// The front door's own end of the backend connection (what the
    /// backend sees as the peer address).
    outbound: Option<SocketAddr>,
    /// How the piping ended; `None` while it runs.
    end: Option<String>,
}

/// A running TCP balancer; stops (and drops every piped connection) on drop.
pub struct FrontDoor {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

// === impl FrontDoor ===

impl FrontDoor {
    /// Binds `127.0.0.1:0` and balances over `backends`, in this order.
    ///
    /// # Panics
    ///
    /// If `backends` is empty or the bind fails.
    pub async fn spawn(backends: &[SocketAddr]) -> Self {
        assert!(!backends.is_empty(), "a front door needs backends");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the front door on 127.0.0.1:0");
        let addr = listener.local_addr().expect("front door local addr");
        let shared = Arc::new(Shared {
            backends: backends.to_vec(),
            next: AtomicUsize::new(0),
            routes: Mutex::new(HashMap::new()),
            refused: AtomicUsize::new(0),
            unrouted: AtomicUsize::new(0),
            routed: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Self { addr, shared, task }
    }

    /// Where clients and agents connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://ADDR{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The backend the connection from `peer` (the client's local address)
    /// was piped to, if it was.
    pub fn backend_of(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.shared
            .routes
            .lock()
            .expect("front door routes poisoned")
            .get(&peer)
            .map(|piped| piped.backend)
    }

    /// How the piping of the connection from `peer` ended: the front door's
    /// address on the backend connection (the peer address the backend saw),
    /// bytes copied each way (client → backend "up", backend → client
    /// "down") and the error that stopped a direction, if any. `None` if it
    /// was not piped or still runs.
    pub fn connection_end(&self, peer: SocketAddr) -> Option<String> {
        self.shared
            .routes
            .lock()
            .expect("front door routes poisoned")
            .get(&peer)
            .and_then(|piped| piped.end.clone())
    }

    /// Inbound connections piped to a backend so far.
    pub fn routed(&self) -> usize {
        self.shared.routed.load(Ordering::SeqCst)
    }

    /// Backend connects that were refused (or timed out) so far; each made
    /// the front door try the next backend.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Inbound connections dropped because no backend accepted.
    pub fn unrouted(&self) -> usize {
        self.shared.unrouted.load(Ordering::SeqCst)
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks (a JoinSet): aborting it
        // drops them all.
        self.task.abort();
    }
}

/// Accepts inbound connections and pipes each in its own task.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((inbound, peer)) = accepted else { continue };
                connections.spawn(pipe(inbound, peer, shared.clone()));
            }
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Connects `inbound` to the first backend, from the round-robin position,
/// that accepts; then copies bytes both ways until both sides are done, or
/// until either fails (then both are dropped, as a balancer resets a broken
/// pair).
async fn pipe(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let count = shared.backends.len();
    let start = shared.next.fetch_add(1, Ordering::SeqCst);
    let mut chosen = None;
    for k in 0..count {
        let backend = shared.backends[(start + k) % count];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(outbound)) => {
                chosen = Some((backend, outbound));
                break;
            }
            Ok(Err(_)) | Err(_) => {
                shared.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let Some((backend, outbound)) = chosen else {
        shared.unrouted.fetch_add(1, Ordering::SeqCst);
        return;
    };
    shared
        .routes
        .lock()
        .expect("front door routes poisoned")
        .insert(
            peer,
            Piped {
                backend,
                outbound: outbound.local_addr().ok(),
                end: None,
            },
        );
    shared.routed.fetch_add(1, Ordering::SeqCst);
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);

    let (client_rx, client_tx) = inbound.into_split();
    let (backend_rx, backend_tx) = outbound.into_split();
    let up = pump(client_rx, backend_tx);
    let down = pump(backend_rx, client_tx);
    tokio::pin!(up, down);
    let (mut up_end, mut down_end) = (None, None);
    while up_end.is_none() || down_end.is_none() {
        tokio::select! {
            end = &mut up, if up_end.is_none() => {
                let failed = end.1.is_some();
                up_end = Some(end);
                if failed { break; }
            }
            end = &mut down, if down_end.is_none() => {
                let failed = end.1.is_some();
                down_end = Some(end);
                if failed { break; }
            }
        }
    }
    let describe = |end: Option<(u64, Option<std::io::Error>)>| match end {
        None => "cut".to_owned(),
        Some((bytes, None)) => format!("{bytes} bytes, then EOF"),
        Some((bytes, Some(err))) => format!("{bytes} bytes, then {err} ({:?})", err.kind()),
    };
    let mut routes = shared.routes.lock().expect("front door routes poisoned");
    if let Some(piped) = routes.get_mut(&peer) {
        let from = piped
            .outbound
            .map_or_else(|| "?".to_owned(), |addr| addr.to_string());
        piped.end = Some(format!(
            "piped from {from}; up {}; down {}",
            describe(up_end),
            describe(down_end)
        ));
    }
}

/// Copies `from` to `to` until EOF (then shuts `to` down for writing) or an
/// error; returns the bytes copied and the error.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> (u64, Option<std::io::Error>) {
    let mut buf = vec![0_u8; 16 * 1024];
    let mut copied = 0_u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return (copied, None);
            }
            Ok(n) => {
                if let Err(err) = to.write_all(&buf[..n]).await {
                    return (copied, Some(err));
                }
                copied += n as u64;
            }
            Err(err) => return (copied, Some(err)),
        }
    }
}
