//! The relay process: shared state, the router, and the serve loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::StatusCode;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::auth::Verifier;
use crate::client;
use crate::config::{Config, ConfigError, DirectoryConfig};
use crate::directory::{Directory, Instrumented, MemoryDirectory, Owner, RedisDirectory};
use crate::drain;
use crate::error::ClientError;
use crate::host;
use crate::host_id::HostId;
use crate::limits::{
    DIRECTORY_SWEEP_BATCH, DIRECTORY_SWEEP_INTERVAL, DIRECTORY_TIMEOUT, LISTEN_BACKLOG,
    RECONCILE_BATCH, RESYNC_FIRST_RETRY, STARTUP_CLEAR_TIMEOUT,
};
use crate::listener::{PeerAddr, StoppableListener};
use crate::registry::Registry;
use crate::routing::Peers;
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
    /// The address peers forward to; known once the listener is bound.
    advertise_addr: OnceLock<String>,
    /// Connections to peer relays (proxy routing).
    peers: Peers,
    /// Set at drain step 1: refuse new tunnels, answer `/ready` with 503, route hosts that
    /// moved to their new owner.
    draining: AtomicBool,
    /// Set at drain step 4: the directory was cleared in one call, so tunnels closing
    /// afterwards need not unregister one by one.
    directory_cleared: AtomicBool,
    /// Token bucket of tunnel registrations.
    admission: DefaultDirectRateLimiter,
    /// Woken when a tunnel's directory write failed: the reconciler retries soon.
    unsynced: Notify,
}

/// Where a client request for a host goes.
#[derive(Debug)]
pub enum Route {
    /// This machine holds the tunnel.
    Local(TunnelHandle),
    /// Another machine does.
    Remote(Owner),
}

impl Relay {
    /// A relay for `config`, with the directory it names (embedded, or Redis). Never
    /// touches the network: a Redis that is down is found out, and healed from, later.
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// When the token key or the Redis URL in `config` is unusable.
    pub fn new(config: Config) -> Result<Relay, ConfigError> {
        let directory: Arc<dyn Directory> = match &config.directory {
            DirectoryConfig::Memory => Arc::new(MemoryDirectory::new(config.limits.directory_ttl)),
            DirectoryConfig::Redis {
                url,
                prefix,
                tls_ca,
            } => {
                let url = String::from_utf8_lossy(url.expose()).into_owned();
                Arc::new(
                    RedisDirectory::with_tls_ca(
                        &url,
                        prefix,
                        config.limits.directory_ttl,
                        tls_ca.as_deref(),
                    )
                    .map_err(|e| ConfigError(format!("REDIS_URL: {e}")))?,
                )
            }
        };
        Relay::with_directory(config, Arc::new(Instrumented::new(directory)))
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
                registry: Registry::default(),
                directory,
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                advertise_addr: OnceLock::new(),
                peers: Peers::new(),
                draining: AtomicBool::new(false),
                directory_cleared: AtomicBool::new(false),
                admission: RateLimiter::direct(
                    Quota::per_second(config.admission_rate).allow_burst(config.admission_burst),
                ),
                unsynced: Notify::new(),
                config,
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

    /// Drain step 1: from now on, refuse new tunnels and report not ready.
    pub fn begin_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the relay is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Drain step 4 is done: this machine's directory entries were cleared at once.
    pub(crate) fn mark_directory_cleared(&self) {
        self.inner.directory_cleared.store(true, Ordering::Relaxed);
    }

    /// Admits one tunnel registration, or says how long to wait (the token bucket is
    /// empty).
    pub(crate) fn admit(&self) -> Result<(), std::time::Duration> {
        use governor::clock::{Clock as _, DefaultClock};
        self.inner
            .admission
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Connections to peer relays.
    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// The address peers forward to (set when the listener is bound).
    pub fn advertise_addr(&self) -> Option<&str> {
        self.inner.advertise_addr.get().map(String::as_str)
    }

    /// Where a request for `host` goes: the local tunnel, or the machine that owns it.
    /// `hopped` says the request was already routed here by another machine (or replayed
    /// by Fly): then only a local tunnel will do, so a request can never loop.
    ///
    /// # Errors
    /// [`ClientError::HostNotConnected`] when no machine holds a tunnel for `host`, when
    /// the directory names this machine but the tunnel is not here (a stale entry), or
    /// when the directory cannot be read.
    pub async fn route(&self, host: &HostId, hopped: bool) -> Result<Route, ClientError> {
        if let Some(tunnel) = self.registry().get(host) {
            // Draining: once the agent has registered its new tunnel elsewhere, new work
            // goes there; the old tunnel here only finishes what it has.
            if self.is_draining()
                && !hopped
                && let Some(owner) = self.lookup(host).await
                && owner != self.config().owner
            {
                return Ok(Route::Remote(owner));
            }
            return Ok(Route::Local(tunnel));
        }
        if hopped {
            debug!(%host, "routed here by a peer but not held here; not forwarding again");
            return Err(ClientError::HostNotConnected);
        }
        match self.lookup(host).await {
            Some(owner) if owner == self.config().owner => {
                debug!(%host, "directory names this machine but the tunnel is gone (stale)");
                Err(ClientError::HostNotConnected)
            }
            Some(owner) => Ok(Route::Remote(owner)),
            None => Err(ClientError::HostNotConnected),
        }
    }

    /// The owner of `host` in the directory; `None` when there is none or the directory
    /// cannot say (logged).
    pub(crate) async fn lookup(&self, host: &HostId) -> Option<Owner> {
        match timeout(DIRECTORY_TIMEOUT, self.directory().lookup(host)).await {
            Ok(Ok(owner)) => owner,
            Ok(Err(err)) => {
                host::directory_failed("lookup", host, &err);
                None
            }
            Err(_) => {
                host::directory_failed("lookup", host, &"timed out");
                None
            }
        }
    }

    /// Removes what a previous process with this machine's identity left in the
    /// directory (after a SIGKILL, say). Best effort and bounded: called before binding,
    /// so nothing can route to this machine for a tunnel it does not hold.
    pub async fn clear_stale_entries(&self) {
        let owner = &self.config().owner;
        match timeout(STARTUP_CLEAR_TIMEOUT, self.directory().clear_owned(owner)).await {
            Ok(Ok(removed)) => {
                info!(removed, %owner, "cleared this machine's stale directory entries")
            }
            Ok(Err(err)) => {
                telemetry::directory_error("clear_owned", owner, &err);
            }
            Err(_) => telemetry::directory_error("clear_owned", owner, &"timed out"),
        }
    }

    /// Publishes this machine as the owner of `host`.
    /// Returns whether the directory now says so; when it does not (Redis down), the
    /// tunnel still serves locally and the reconciler publishes it later.
    pub(crate) async fn publish(&self, host: &HostId) -> bool {
        let owner = &self.config().owner;
        match timeout(DIRECTORY_TIMEOUT, self.directory().register(host, owner)).await {
            Ok(Ok(Some(previous))) => {
                info!(%previous, "took the host over from another machine");
                true
            }
            Ok(Ok(None)) => true,
            Ok(Err(err)) => {
                host::directory_failed("register", host, &err);
                self.inner.unsynced.notify_one();
                false
            }
            Err(_) => {
                host::directory_failed("register", host, &"timed out");
                self.inner.unsynced.notify_one();
                false
            }
        }
    }

    /// Removes this machine's entry for `host` (compare-and-delete).
    pub(crate) async fn unpublish(&self, host: &HostId) {
        if self.inner.directory_cleared.load(Ordering::Relaxed) {
            return;
        }
        let owner = &self.config().owner;
        match timeout(DIRECTORY_TIMEOUT, self.directory().unregister(host, owner)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => host::directory_failed("unregister", host, &err),
            Err(_) => host::directory_failed("unregister", host, &"timed out"),
        }
        if self.inner.directory_cleared.load(Ordering::Relaxed) {
            // The drain removed every entry of this machine in one call already.
            return;
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
        .route("/admin/tunnels", get(crate::admin::tunnels))
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
    if relay.is_draining() || relay.shutdown_token().is_cancelled() {
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
    let advertise = relay.config().advertise_addr(addr);
    let _ = relay.inner.advertise_addr.set(advertise.clone());
    relay.tracker().spawn(sweep_loop(
        relay.directory().clone(),
        relay.config().owner.clone(),
        relay.shutdown_token().clone(),
    ));
    relay.tracker().spawn(reconcile_loop(relay.clone()));
    info!(
        %addr,
        region = %relay.config().owner.region,
        machine = %relay.config().owner.machine_id,
        directory = relay.directory().kind(),
        routing = ?relay.config().routing,
        %advertise,
        "listening"
    );

    // Two separate stops: `stop_accepting` (drain step 4) closes the listening socket, so
    // new connections are refused and go to another machine; `finish_connections` (the
    // end of the drain) makes the server finish its connections.
    let stop_accepting = CancellationToken::new();
    let listener = StoppableListener::new(listener, stop_accepting.clone())?;
    let (finish_connections, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        axum::serve(
            listener,
            app(relay.clone()).into_make_service_with_connect_info::<PeerAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = finish_rx.await;
        })
        .into_future(),
    );
    tokio::select! {
        result = &mut server => {
            relay.shutdown_token().cancel();
            return Err(match result {
                Ok(Ok(())) => anyhow::anyhow!("the listener stopped unexpectedly"),
                Ok(Err(err)) => anyhow::Error::new(err).context("the listener failed"),
                Err(err) => anyhow::Error::new(err).context("the server task failed"),
            });
        }
        () = shutdown => {}
    }

    let started = Instant::now();
    let deadline = relay.config().drain_deadline;
    let stop = stop_accepting.clone();
    if timeout(deadline, drain::run(&relay, move || stop.cancel()))
        .await
        .is_err()
    {
        warn!(?deadline, "drain deadline reached; exiting with work left");
    }
    stop_accepting.cancel();
    let _ = finish_connections.send(());
    // Whatever is left (tunnels, channels, background loops) ends now, within what
    // remains of the deadline.
    relay.shutdown_token().cancel();
    relay.tracker().close();
    let remaining = deadline.saturating_sub(started.elapsed());
    if timeout(remaining, relay.tracker().wait()).await.is_err() {
        warn!("tasks still running at the drain deadline");
    }
    let remaining = deadline.saturating_sub(started.elapsed());
    if timeout(remaining, server).await.is_err() {
        warn!("client connections still open at the drain deadline");
    }
    info!(elapsed = ?started.elapsed(), "stopped");
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
                Ok(swept) => debug!(swept, "stale directory records dropped"),
                Err(err) => telemetry::directory_error("sweep", &owner, &err),
            },
        }
    }
}

/// Every interval: advertise this machine's address, and re-assert ownership of every
/// local tunnel in batches, writing only entries that are absent or already ours. This is
/// what heals the directory after a Redis restart, flush or failover without any host
/// reconnecting, and what publishes tunnels that registered while Redis was down.
///
/// Between intervals, once a tunnel's own directory write failed, only the tunnels not yet
/// published are retried: after [`RESYNC_FIRST_RETRY`], then twice as long each time
/// while some remain, up to the interval.
async fn reconcile_loop(relay: Relay) {
    let interval = relay.config().reconcile_interval;
    let owner = relay.config().owner.clone();
    let shutdown = relay.shutdown_token().clone();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now(), interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_delay = RESYNC_FIRST_RETRY;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let full = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => true,
            () = relay.inner.unsynced.notified(), if retry_at.is_none() => {
                retry_at = Some(tokio::time::Instant::now() + retry_delay);
                continue;
            }
            () = sleep_until_or_never(retry_at) => false,
        };
        if full {
            advertise(&relay, &owner, interval).await;
        }
        let handles = relay
            .registry()
            .handles_where(|handle| full || !handle.is_synced());
        let written = reassert(&relay, &owner, &handles).await;
        if written > 0 {
            telemetry::reconciled(written);
            debug!(written, full, "reconciler restored directory entries");
        }
        if handles.iter().any(|handle| !handle.is_synced()) {
            retry_at = Some(tokio::time::Instant::now() + retry_delay);
            retry_delay = (retry_delay * 2).min(interval);
        } else {
            retry_at = None;
            retry_delay = RESYNC_FIRST_RETRY;
        }
    }
}

/// Resolves at `at`, or never when there is none.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Publishes this machine's peer address for three reconcile intervals.
async fn advertise(relay: &Relay, owner: &Owner, interval: Duration) {
    let Some(addr) = relay.advertise_addr() else {
        return;
    };
    // Three rounds of slack: one missed round does not hide this machine.
    let ttl = interval.saturating_mul(3);
    match timeout(
        DIRECTORY_TIMEOUT,
        relay.directory().advertise(owner, addr, ttl),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(err)) => telemetry::directory_error("advertise", owner, &err),
        Err(_) => telemetry::directory_error("advertise", owner, &"timed out"),
    }
}

/// Re-asserts the entries of `handles` in batches; marks each batch that went through as
/// synced. Stops at the first failure: the next batches would only wait on the same sick
/// Redis. Returns how many entries were written.
async fn reassert(relay: &Relay, owner: &Owner, handles: &[TunnelHandle]) -> usize {
    let mut written = 0;
    for batch in handles.chunks(RECONCILE_BATCH) {
        let hosts: Vec<HostId> = batch.iter().map(|h| h.host().clone()).collect();
        match timeout(DIRECTORY_TIMEOUT, relay.directory().reassert(&hosts, owner)).await {
            Ok(Ok(n)) => {
                written += n;
                for handle in batch {
                    handle.set_synced(true);
                }
            }
            Ok(Err(err)) => {
                telemetry::directory_error("reassert", owner, &err);
                break;
            }
            Err(_) => {
                telemetry::directory_error("reassert", owner, &"timed out");
                break;
            }
        }
    }
    written
}
