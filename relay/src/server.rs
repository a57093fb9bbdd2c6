//! The serve loop: bind, serve the router until a signal, then drain and exit.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::connections;
use crate::drain;
use crate::limits::LISTEN_BACKLOG;
use crate::listener::StoppableListener;
use crate::ownership;
use crate::router::app;
use crate::state::Relay;
use crate::telemetry;

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
    // An identity provider's keys, before the first token (bounded by its timeout; a
    // provider that does not answer is logged, and tried again as tokens come).
    relay.verifier().load_keys().await;
    let advertise = relay.config().advertise_addr(addr);
    relay.set_advertise_addr(advertise.clone());
    ownership::spawn_background(&relay);
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
    let finish_connections = CancellationToken::new();
    let mut limits = relay.config().limits.clone();
    limits.max_connections = crate::limits::max_connections(limits.max_connections);
    info!(
        max_connections = limits.max_connections,
        memory_budget = relay.memory().size(),
        tunnel_budget = limits.tunnel_budget,
        "connection and memory limits"
    );
    let tls = match relay.config().tls.clone() {
        Some(files) => {
            let tls = crate::tls::Tls::new(files).map_err(anyhow::Error::msg)?;
            relay
                .tracker()
                .spawn(tls.clone().follow_files(relay.shutdown_token().clone()));
            Some(tls)
        }
        None => None,
    };
    let mut server = tokio::spawn({
        let app = app(relay.clone());
        let finish = finish_connections.clone();
        let memory = relay.memory().clone();
        let app = move |request| app.clone().serve(request);
        async move { connections::serve(listener, app, &limits, &memory, tls, finish).await }
    });
    tokio::select! {
        result = &mut server => {
            relay.shutdown_token().cancel();
            return Err(match result {
                Ok(()) => anyhow::anyhow!("the listener stopped unexpectedly"),
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
    finish_connections.cancel();
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
