//! The relay process: shared state, the router, and the serve loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use http::StatusCode;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::auth::Verifier;
use crate::client;
use crate::config::{Config, ConfigError};
use crate::directory::{Directory, MemoryDirectory, Owner};
use crate::error::ClientError;
use crate::host;
use crate::host_id::HostId;
use crate::limits::{
    DIRECTORY_SWEEP_BATCH, DIRECTORY_SWEEP_INTERVAL, DIRECTORY_TIMEOUT, LISTEN_BACKLOG,
    SHUTDOWN_GRACE,
};
use crate::registry::Registry;
use crate::telemetry::{self, redact_uri};
use crate::tunnel::TunnelHandle;

/// The state of one relay process, shared by every handler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    verifier: Verifier,
    registry: Registry,
    directory: Arc<dyn Directory>,
    /// Every long-lived task (tunnel sessions, client channels, background loops): axum's
    /// graceful shutdown does not see upgraded sockets, so shutdown waits on this.
    tracker: TaskTracker,
    /// Cancelled when the relay shuts down; every tunnel's token is a child of it.
    shutdown: CancellationToken,
}

impl Relay {
    /// A relay for `config`, with the embedded in-memory directory.
    ///
    /// # Errors
    /// When the token key in `config` is unusable.
    pub fn new(config: Config) -> Result<Relay, ConfigError> {
        let directory = Arc::new(MemoryDirectory::new(config.limits.directory_ttl));
        Relay::with_directory(config, directory)
    }

    /// A relay for `config` with the given directory.
    ///
    /// # Errors
    /// When the token key in `config` is unusable.
    pub fn with_directory(
        config: Config,
        directory: Arc<dyn Directory>,
    ) -> Result<Relay, ConfigError> {
        Ok(Relay {
            inner: Arc::new(Inner {
                verifier: config.verifier()?,
                config,
                registry: Registry::default(),
                directory,
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The token verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// The local tunnels.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The directory.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.inner.directory
    }

    /// The tracker of long-lived tasks.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// The token cancelled at shutdown.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The tunnel that serves `host`: the local one, or none.
    ///
    /// # Errors
    /// [`ClientError::HostNotConnected`] when no machine holds a tunnel for `host`, or
    /// the directory names this machine but the tunnel is not here (a stale entry: never
    /// forwarded, so it can never loop).
    pub async fn route(&self, host: &HostId) -> Result<TunnelHandle, ClientError> {
        if let Some(tunnel) = self.registry().get(host) {
            return Ok(tunnel);
        }
        match timeout(DIRECTORY_TIMEOUT, self.directory().lookup(host)).await {
            Ok(Ok(Some(owner))) if owner == self.config().owner => {
                debug!(%host, "directory names this machine but the tunnel is gone (stale)");
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => host::directory_failed("lookup", host, &err),
            Err(_) => host::directory_failed("lookup", host, &"timed out"),
        }
        Err(ClientError::HostNotConnected)
    }

    /// Publishes this machine as the owner of `host`.
    pub(crate) async fn publish(&self, host: &HostId) {
        let owner = &self.config().owner;
        match timeout(DIRECTORY_TIMEOUT, self.directory().register(host, owner)).await {
            Ok(Ok(Some(previous))) => info!(%previous, "took the host over from another machine"),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => host::directory_failed("register", host, &err),
            Err(_) => host::directory_failed("register", host, &"timed out"),
        }
    }

    /// Removes this machine's entry for `host` (compare-and-delete).
    pub(crate) async fn unpublish(&self, host: &HostId) {
        let owner = &self.config().owner;
        match timeout(DIRECTORY_TIMEOUT, self.directory().unregister(host, owner)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => host::directory_failed("unregister", host, &err),
            Err(_) => host::directory_failed("unregister", host, &"timed out"),
        }
        // A new tunnel for the same host may have registered here while the removal was
        // in flight, and the entry it wrote has the same owner value: put it back.
        if self.registry().contains(host) {
            self.publish(host).await;
        }
    }

    /// Refreshes the directory entry of `host` in the background (called on every pong).
    pub(crate) fn heartbeat(&self, host: &HostId) {
        let relay = self.clone();
        let host = host.clone();
        self.tracker().spawn(async move {
            let owner = &relay.config().owner;
            match timeout(DIRECTORY_TIMEOUT, relay.directory().heartbeat(&host, owner)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => debug!(%host, "heartbeat found no entry of ours to refresh"),
                Ok(Err(err)) => host::directory_failed("heartbeat", &host, &err),
                Err(_) => host::directory_failed("heartbeat", &host, &"timed out"),
            }
        });
    }
}

/// The relay's HTTP routes. Separate from serving so tests can drive it directly.
pub fn app(relay: Relay) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/tunnel", get(host::accept))
        .route("/hosts/{host}", any(client::host_request))
        .route("/hosts/{host}/", any(client::host_request))
        .route("/hosts/{host}/{*rest}", any(client::host_request))
        .fallback(not_found)
        .layer(middleware::from_fn(trace_request))
        .with_state(relay)
}

async fn health(State(relay): State<Relay>) -> impl IntoResponse {
    axum::Json(json!({
        "ok": true,
        "region": relay.config().owner.region,
        "machine": relay.config().owner.machine_id,
    }))
}

async fn ready(State(relay): State<Relay>) -> Response {
    if relay.shutdown_token().is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ok": false, "state": "draining"})),
        )
            .into_response();
    }
    axum::Json(json!({"ok": true})).into_response()
}

async fn metrics() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::metrics_handle().render(),
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": "not found"})),
    )
}

/// A debug span and line per request, with the URI redacted. Off the hot path unless
/// debug logging is on.
async fn trace_request(request: Request, next: Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(request).await;
    }
    let span = debug_span!(
        "request",
        method = %request.method(),
        uri = %redact_uri(&request.uri().to_string()),
    );
    async move {
        let started = tokio::time::Instant::now();
        let response = next.run(request).await;
        debug!(status = response.status().as_u16(), elapsed = ?started.elapsed(), "request finished");
        response
    }
    .instrument(span)
    .await
}

/// Binds the listening socket: dual stack when `addr` is IPv6 unspecified, address reuse
/// so a restarted relay can bind at once, and a backlog sized for reconnect storms.
///
/// # Errors
/// When the address cannot be bound (in use, no permission).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Serves the relay on `listener` until `shutdown` resolves, then closes every tunnel
/// (4001), removes this machine's directory entries and waits (bounded) for every tracked
/// task.
///
/// # Errors
/// When the listener fails or the configuration is unusable.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let relay = Relay::new(config)?;
    serve(listener, relay, shutdown).await
}

/// [`run`] with a relay already built.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: TcpListener,
    relay: Relay,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // Install the recorder before anything is counted.
    telemetry::metrics_handle();
    relay.tracker().spawn(sweep_loop(
        relay.directory().clone(),
        relay.config().owner.clone(),
        relay.shutdown_token().clone(),
    ));
    info!(
        %addr,
        region = %relay.config().owner.region,
        machine = %relay.config().owner.machine_id,
        "listening"
    );

    let token = relay.shutdown_token().clone();
    let listener = listener.tap_io(|tcp| {
        // Small frames (pings, short responses) must not wait for Nagle.
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        app(relay.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        info!("shutting down");
        // Close the tunnels now: their pending exchanges fail at once, so client
        // connections can finish and the server can stop.
        token.cancel();
    })
    .await?;

    relay.shutdown_token().cancel();
    relay.tracker().close();
    if timeout(SHUTDOWN_GRACE, relay.tracker().wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "tasks still running at the end of the grace period");
    }
    match timeout(
        DIRECTORY_TIMEOUT,
        relay.directory().clear_owned(&relay.config().owner),
    )
    .await
    {
        Ok(Ok(removed)) => info!(removed, "directory entries of this machine removed"),
        Ok(Err(err)) => warn!(error = %err, "could not clear this machine's directory entries"),
        Err(_) => warn!("clearing this machine's directory entries timed out"),
    }
    info!("stopped");
    Ok(())
}

/// Drops this machine's stale directory records now and then.
async fn sweep_loop(directory: Arc<dyn Directory>, owner: Owner, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(DIRECTORY_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => match directory.sweep(&owner, DIRECTORY_SWEEP_BATCH).await {
                Ok(0) => {}
                Ok(swept) => debug!(swept, "expired directory entries dropped"),
                Err(err) => {
                    telemetry::directory_error("sweep");
                    warn!(error = %err, "directory sweep failed");
                }
            },
        }
    }
}
