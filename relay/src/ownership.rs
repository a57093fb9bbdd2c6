//! This machine's entries in the directory: publish a tunnel's host, refresh it on every
//! pong, remove it when the tunnel ends, and heal it in the background.
//!
//! Every directory write of the relay goes through here, under [`DIRECTORY_TIMEOUT`]: a
//! slow or unreachable directory degrades to "serve what is local", never stalls a
//! registration or a request. A write that fails leaves the tunnel unsynced, and the
//! reconciler (the reconcile loop) writes it again later.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::RoutingMode;
use crate::directory::{Directory, Owner};
use crate::host_id::HostId;
use crate::limits::{
    CLAIMS_PASS_TIME, CLAIMS_PER_PASS, DIRECTORY_SWEEP_BATCH, DIRECTORY_SWEEP_INTERVAL,
    DIRECTORY_TIMEOUT, MOVING_MARK_TTL, PEER_PROBE_TIMEOUT, RECONCILE_BATCH, RESYNC_FIRST_RETRY,
    STARTUP_CLEAR_TIMEOUT,
};
use crate::state::Relay;
use crate::telemetry;
use crate::tunnel::TunnelHandle;

/// The owner of `host` in the directory; `None` when there is none or the directory
/// cannot say (logged).
pub(crate) async fn lookup(relay: &Relay, host: &HostId) -> Option<Owner> {
    match timeout(DIRECTORY_TIMEOUT, relay.directory().lookup(host)).await {
        Ok(Ok(owner)) => owner,
        Ok(Err(err)) => {
            telemetry::directory_error("lookup", host, &err);
            None
        }
        Err(_) => {
            telemetry::directory_error("lookup", host, &"timed out");
            None
        }
    }
}

/// Removes what a previous process with this machine's identity left in the directory
/// (after a SIGKILL, say). Best effort and bounded: called before binding, so nothing can
/// route to this machine for a tunnel it does not hold.
pub async fn clear_stale_entries(relay: &Relay) {
    let owner = &relay.config().owner;
    match timeout(STARTUP_CLEAR_TIMEOUT, relay.directory().clear_owned(owner)).await {
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
/// Returns whether the directory now says so; when it does not (Redis down), the tunnel
/// still serves locally and the reconciler publishes it later.
pub(crate) async fn publish(relay: &Relay, host: &HostId) -> bool {
    let owner = &relay.config().owner;
    match timeout(DIRECTORY_TIMEOUT, relay.directory().register(host, owner)).await {
        Ok(Ok(Some(previous))) => {
            info!(%previous, "took the host over from another machine");
            true
        }
        Ok(Ok(None)) => true,
        Ok(Err(err)) => {
            telemetry::directory_error("register", host, &err);
            relay.unsynced().notify_one();
            false
        }
        Err(_) => {
            telemetry::directory_error("register", host, &"timed out");
            relay.unsynced().notify_one();
            false
        }
    }
}

/// Removes this machine's entry for `host` (compare-and-delete).
pub(crate) async fn unpublish(relay: &Relay, host: &HostId) {
    if relay.is_directory_cleared() {
        return;
    }
    let owner = &relay.config().owner;
    match timeout(DIRECTORY_TIMEOUT, relay.directory().unregister(host, owner)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => telemetry::directory_error("unregister", host, &err),
        Err(_) => telemetry::directory_error("unregister", host, &"timed out"),
    }
    if relay.is_directory_cleared() {
        // The drain removed every entry of this machine in one call already.
        return;
    }
    // A new tunnel for the same host may have registered here while the removal was in
    // flight, and the entry it wrote has the same owner value: put it back.
    if relay.registry().contains(host) {
        publish(relay, host).await;
    }
}

/// Lets `hosts` go while draining (`None`: every host this machine still owns): their
/// entries are removed and marked *moving* for [`MOVING_MARK_TTL`], so that every relay
/// holds requests for them while they register elsewhere ([`is_moving`]). Returns how
/// many were removed, or `None` when the directory did not answer (logged).
pub(crate) async fn retire(relay: &Relay, hosts: Option<&[HostId]>) -> Option<usize> {
    let owner = &relay.config().owner;
    match timeout(
        DIRECTORY_TIMEOUT,
        relay.directory().retire(owner, hosts, MOVING_MARK_TTL),
    )
    .await
    {
        Ok(Ok(removed)) => Some(removed),
        Ok(Err(err)) => {
            telemetry::directory_error("retire", owner, &err);
            None
        }
        Err(_) => {
            telemetry::directory_error("retire", owner, &"timed out");
            None
        }
    }
}

/// Whether `host` is moving: a draining relay let it go moments ago. False when the
/// directory cannot say (logged).
pub(crate) async fn is_moving(relay: &Relay, host: &HostId) -> bool {
    match timeout(DIRECTORY_TIMEOUT, relay.directory().is_moving(host)).await {
        Ok(Ok(moving)) => moving,
        Ok(Err(err)) => {
            telemetry::directory_error("is_moving", host, &err);
            false
        }
        Err(_) => {
            telemetry::directory_error("is_moving", host, &"timed out");
            false
        }
    }
}

/// Refreshes the directory entry of `host` in the background (called on every pong).
pub(crate) fn heartbeat(relay: &Relay, host: &HostId) {
    let tracker = relay.tracker().clone();
    let relay = relay.clone();
    let host = host.clone();
    tracker.spawn(async move {
        let owner = &relay.config().owner;
        match timeout(DIRECTORY_TIMEOUT, relay.directory().heartbeat(&host, owner)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => debug!(%host, "heartbeat found no entry of ours to refresh"),
            Ok(Err(err)) => telemetry::directory_error("heartbeat", &host, &err),
            Err(_) => telemetry::directory_error("heartbeat", &host, &"timed out"),
        }
    });
}

/// Starts the background loops that keep the directory healthy: the sweep of this
/// machine's stale records and the reconciler. Both end at shutdown.
pub(crate) fn spawn_background(relay: &Relay) {
    relay.tracker().spawn(sweep_loop(
        relay.directory().clone(),
        relay.config().owner.clone(),
        relay.shutdown_token().clone(),
    ));
    relay.tracker().spawn(reconcile_loop(relay.clone()));
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
            () = relay.unsynced().notified(), if retry_at.is_none() => {
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

/// Where peers reach `owner`: on Fly its private address, else the one it advertised.
pub(crate) async fn address_of(relay: &Relay, owner: &Owner) -> Option<String> {
    match (relay.config().routing, &relay.config().app_name) {
        (RoutingMode::FlyReplay, Some(app)) => Some(format!(
            "{}.vm.{app}.internal:{}",
            owner.machine_id,
            relay.config().listen.port()
        )),
        _ => match timeout(
            crate::limits::DIRECTORY_TIMEOUT,
            relay.directory().address_of(owner),
        )
        .await
        {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => {
                telemetry::directory_error("address_of", owner, &err);
                None
            }
            Err(_) => {
                telemetry::directory_error("address_of", owner, &"timed out");
                None
            }
        },
    }
}

/// Asks `owner` whether it holds `host`'s tunnel (`GET /relay/holds/{hostId}`, with the
/// hop key): `None` when it cannot be asked or does not answer in time.
pub(crate) async fn peer_holds(relay: &Relay, owner: &Owner, host: &HostId) -> Option<bool> {
    use http_body_util::BodyExt as _;
    let addr = address_of(relay, owner).await?;
    let key = relay.hop_key().await?;
    let mut request = http::Request::new(axum::body::Body::empty());
    *request.uri_mut() = format!("http://{addr}/relay/holds/{host}").parse().ok()?;
    request
        .headers_mut()
        .insert(crate::headers::HOP_AUTH, key.parse().ok()?);
    let answer = timeout(PEER_PROBE_TIMEOUT, async {
        let response = relay.peers().client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()?
            .get("holds")?
            .as_bool()
    })
    .await;
    answer.ok().flatten()
}

/// Removes this machine's entry for `host`, in the background, if it names this
/// machine while no tunnel for it is here (see [`crate::routing::route`]).
pub(crate) fn remove_stale(relay: &Relay, host: &HostId) {
    if relay.registry().contains(host) {
        return;
    }
    let tracker = relay.tracker().clone();
    let relay = relay.clone();
    let host = host.clone();
    tracker.spawn(async move {
        let owner = &relay.config().owner;
        if let Ok(Ok(true)) = timeout(
            DIRECTORY_TIMEOUT,
            relay.directory().unregister(&host, owner),
        )
        .await
        {
            info!(%host, "removed a stale directory entry naming this machine");
            telemetry::stale_entry("removed");
        }
        // A tunnel for the host may have registered here meanwhile: put it back.
        if relay.registry().contains(&host) {
            publish(&relay, &host).await;
        }
    });
}

/// For hosts of `handles` whose entries the reconciler could not write because they
/// name another machine: asks that machine whether it still holds the host, and takes
/// the entry over when it says it does not (its removal was lost to an outage while the
/// agent moved here). A machine that holds it, or cannot be asked, keeps it: it may
/// have registered the host later. At most [`CLAIMS_PER_PASS`] are asked per pass.
async fn claim_from_stale_owners(relay: &Relay, owner: &Owner, handles: &[TunnelHandle]) {
    let hosts: Vec<HostId> = handles.iter().map(|h| h.host().clone()).collect();
    let Ok(Ok(recorded)) = timeout(DIRECTORY_TIMEOUT, relay.directory().lookup_many(&hosts)).await
    else {
        return;
    };
    let elsewhere = handles
        .iter()
        .zip(recorded)
        .filter_map(|(handle, recorded)| match recorded {
            Some(recorded) if recorded != *owner && !handle.has_moved() && !handle.is_closed() => {
                Some((handle.host().clone(), recorded))
            }
            _ => None,
        })
        .take(CLAIMS_PER_PASS);
    // A machine that cannot be asked is not asked again this pass, and the pass stops
    // asking at its deadline: a peer that is down must not hold the reconciler (and the
    // tunnels it publishes) for a hundred probe timeouts.
    let deadline = tokio::time::Instant::now() + CLAIMS_PASS_TIME;
    let mut unreachable: Vec<Owner> = Vec::new();
    for (host, recorded) in elsewhere {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if unreachable.contains(&recorded) {
            continue;
        }
        match peer_holds(relay, &recorded, &host).await {
            Some(false) => {}
            Some(true) => continue,
            None => {
                unreachable.push(recorded);
                continue;
            }
        }
        match timeout(
            DIRECTORY_TIMEOUT,
            relay.directory().take_over(&host, &recorded, owner),
        )
        .await
        {
            Ok(Ok(true)) => {
                info!(%host, previous = %recorded, "took over a directory entry whose owner no longer holds the host");
                telemetry::stale_entry("taken_over");
            }
            Ok(Ok(false)) => {}
            Ok(Err(err)) => telemetry::directory_error("take_over", &host, &err),
            Err(_) => telemetry::directory_error("take_over", &host, &"timed out"),
        }
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
                if n < batch.len() {
                    claim_from_stale_owners(relay, owner, batch).await;
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
