//! The graceful drain: how a relay machine leaves without failing a request.
//!
//! Run once, on the first SIGINT/SIGTERM, under the hard deadline
//! (`RELAY_DRAIN_DEADLINE`, 8 s by default, below Fly's 10 s `kill_timeout`). The steps,
//! in this order, each logged with its duration:
//!
//! 1. **Mark draining.** `/ready` answers 503; new tunnel registrations are refused and
//!    pointed elsewhere (`fly-replay: elsewhere=true` on Fly, else 503 `Retry-After: 0`).
//! 2. **Tell every tunnel**: v1 `{"type":"drain"}`. Agents open a new tunnel elsewhere at
//!    once and keep the old one for what is in flight. A tunnel whose protocol has no such
//!    message (superset's v2 control channels) is let go instead: its host's entry is
//!    removed and marked *moving* (so every relay holds requests for it until it
//!    registers again, [`crate::routing`]), and its control channel closed (4001), which
//!    makes the host reconnect elsewhere; its streams in flight run on.
//! 3. **Keep serving** the tunnels still here (direct, replayed or forwarded requests;
//!    channels continue). Once a host has registered elsewhere, new requests for it are
//!    routed to its new owner. Ends when every agent has closed its old tunnel; or when
//!    every tunnel still here belongs to a host the directory shows registered on another
//!    machine and carries nothing (polled every [`DRAIN_MOVED_POLL`]: agents that keep
//!    an idle old tunnel open after moving do not hold the drain); or, on the embedded
//!    directory (one machine: there is nowhere for agents to go, so the grace would only
//!    make Ctrl-C slow), as soon as no tunnel carries anything; or after the drain grace
//!    (`RELAY_DRAIN_GRACE`, 3 s).
//! 4. **Stop accepting** TCP connections, then remove every directory entry this machine
//!    still owns with the one retire script, and wait for it: each is marked moving, so
//!    requests for hosts whose agents ignored the drain are held while they come back.
//!    Entries that agents already re-registered elsewhere survive (compare-and-delete).
//!    A Redis that is down fails this step fast, logged.
//! 5. **Close** every remaining tunnel with 4001 (preceded by `drain` if it missed it) and
//!    its channels with 1001; answers to exchanges in flight still get through during the
//!    close handshake, for at most 1.5 s.
//! 6. **Exit 0.**

use std::fmt;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use tracing::{info, warn};

use crate::host_id::HostId;
use crate::limits::{
    CLOSE_TIMEOUT, DIRECTORY_TIMEOUT, DRAIN_CLOSE_WAIT, DRAIN_MOVED_POLL, LOOKUP_BATCH,
};
use crate::protocol::{DRAIN_REASON, close_code};
use crate::state::Relay;
use crate::telemetry;
use crate::tunnel::TunnelHandle;

/// What one drain did, for the log and the benchmarks.
#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    /// Tunnels that were sent `drain` in step 2.
    pub notified: usize,
    /// Tunnels without a drain message, let go and closed in step 2.
    pub let_go: usize,
    /// Time to queue `drain` on every tunnel (step 2).
    pub notify_time: Duration,
    /// Why step 3 ended.
    pub grace_end: GraceEnd,
    /// Tunnels still here when step 3 ended.
    pub stayed: usize,
    /// Directory entries removed in step 4, when the directory answered.
    pub cleared: Option<usize>,
    /// Time of the clear-owned call (step 4).
    pub clear_time: Duration,
    /// Tunnels closed with 4001 in step 5.
    pub closed: usize,
    /// The whole drain.
    pub total: Duration,
}

/// Why the keep-serving step (3) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraceEnd {
    /// Every agent closed its tunnel here.
    AllClosed,
    /// Every tunnel still here is idle and its host registered on another machine.
    AllMoved,
    /// One machine alone (the embedded directory): nowhere for agents to go, and no
    /// tunnel carries anything.
    AloneIdle,
    /// The drain grace ran out first.
    #[default]
    GraceOver,
}

impl fmt::Display for GraceEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GraceEnd::AllClosed => "all_closed",
            GraceEnd::AllMoved => "all_moved",
            GraceEnd::AloneIdle => "alone_idle",
            GraceEnd::GraceOver => "grace_over",
        })
    }
}

/// Runs the drain sequence. `stop_accepting` is called at step 4 and must make the
/// listener stop accepting new connections.
///
/// # Cancel safety
/// Dropping the future (the hard deadline) abandons the remaining steps; the caller then
/// cancels every task and exits.
pub async fn run(relay: &Relay, stop_accepting: impl FnOnce()) -> DrainReport {
    let started = Instant::now();
    let mut report = DrainReport::default();
    let config = relay.config();

    // 1.
    let step = Instant::now();
    relay.begin_draining();
    info!(elapsed = ?step.elapsed(), "drain 1/6: draining; readiness off, new tunnels refused");

    // 2.
    let step = Instant::now();
    let handles = relay.registry().handles();
    let (told, untold): (Vec<_>, Vec<_>) = handles.iter().partition(|h| h.hears_drain());
    report.notified = told.iter().filter(|h| h.drain(DRAIN_REASON)).count();
    report.let_go = untold.len();
    for batch in untold.chunks(LOOKUP_BATCH) {
        let hosts: Vec<HostId> = batch.iter().map(|h| h.host().clone()).collect();
        crate::ownership::retire(relay, Some(&hosts)).await;
        for handle in batch {
            handle.mark_moved();
            handle.close(close_code::DRAINING);
        }
    }
    report.notify_time = step.elapsed();
    info!(
        tunnels = handles.len(),
        notified = report.notified,
        let_go = report.let_go,
        elapsed = ?report.notify_time,
        "drain 2/6: drain sent to every tunnel"
    );
    drop(handles);

    // 3.
    let step = Instant::now();
    let alone = relay.directory().kind() == "memory";
    let wait = async {
        tokio::select! {
            biased;
            () = relay.registry().wait_empty() => GraceEnd::AllClosed,
            () = all_moved_and_idle(relay) => GraceEnd::AllMoved,
            () = all_idle(relay), if alone => GraceEnd::AloneIdle,
        }
    };
    report.grace_end = timeout(config.drain_grace, wait)
        .await
        .unwrap_or(GraceEnd::GraceOver);
    report.stayed = relay.registry().len();
    info!(
        ended = %report.grace_end,
        remaining = report.stayed,
        elapsed = ?step.elapsed(),
        "drain 3/6: agents moved or grace over"
    );

    // 4.
    let step = Instant::now();
    stop_accepting();
    report.cleared = crate::ownership::retire(relay, None).await;
    relay.mark_directory_cleared();
    report.clear_time = step.elapsed();
    match report.cleared {
        Some(removed) => info!(
            removed,
            elapsed = ?report.clear_time,
            "drain 4/6: stopped accepting; this machine's directory entries removed"
        ),
        None => warn!(
            elapsed = ?report.clear_time,
            "drain 4/6: stopped accepting; could NOT remove this machine's directory entries \
             (they expire by TTL; peers answer 503 for them meanwhile)"
        ),
    }

    // 5.
    let step = Instant::now();
    let handles = relay.registry().handles();
    report.closed = handles.len();
    for handle in &handles {
        handle.close(close_code::DRAINING);
    }
    drop(handles);
    // Each session waits up to DRAIN_CLOSE_WAIT for answers in flight, then up to
    // CLOSE_TIMEOUT for the close handshake, then unregisters; a little slack covers the
    // unregistering itself.
    let closed = timeout(
        DRAIN_CLOSE_WAIT + CLOSE_TIMEOUT + Duration::from_millis(250),
        relay.registry().wait_empty(),
    )
    .await
    .is_ok();
    info!(
        tunnels = report.closed,
        all_closed = closed,
        elapsed = ?step.elapsed(),
        "drain 5/6: remaining tunnels closed with 4001"
    );

    report.total = started.elapsed();
    telemetry::drained(report.total.as_secs_f64());
    info!(elapsed = ?report.total, "drain 6/6: done, exiting");
    report
}

/// Resolves once no tunnel carries anything (no exchange in flight, no channel), looking
/// every [`DRAIN_MOVED_POLL`].
///
/// # Cancel safety
/// Cancel safe: it only reads.
async fn all_idle(relay: &Relay) {
    while relay
        .registry()
        .any(|h| h.pending_exchanges() > 0 || h.open_channels() > 0)
    {
        sleep(DRAIN_MOVED_POLL).await;
    }
}

/// Resolves once every tunnel still here is idle (no exchange in flight, no channel) and
/// the directory names another machine for its host: its agent has moved and only keeps
/// the old tunnel open (to finish work, or waiting for the 4001), so there is nothing left
/// to wait for. Never resolves while the directory cannot be read (the grace ends it).
///
/// Tunnels whose host moved are marked ([`TunnelHandle::mark_moved`]: their end no
/// longer touches the directory) and not asked about again: a host registered elsewhere
/// stays there, since only a newer registration could take it back and this machine
/// refuses them while draining.
///
/// # Cancel safety
/// Cancel safe: it only reads.
async fn all_moved_and_idle(relay: &Relay) {
    let own = &relay.config().owner;
    loop {
        sleep(DRAIN_MOVED_POLL).await;
        let handles = relay.registry().handles();
        let unknown: Vec<&TunnelHandle> = handles
            .iter()
            .filter(|handle| !handle.has_moved())
            .collect();
        for batch in unknown.chunks(LOOKUP_BATCH) {
            let hosts: Vec<HostId> = batch.iter().map(|handle| handle.host().clone()).collect();
            let owners =
                match timeout(DIRECTORY_TIMEOUT, relay.directory().lookup_many(&hosts)).await {
                    Ok(Ok(owners)) => owners,
                    Ok(Err(err)) => {
                        telemetry::directory_error("lookup_many", own, &err);
                        break;
                    }
                    Err(_) => {
                        telemetry::directory_error("lookup_many", own, &"timed out");
                        break;
                    }
                };
            for (handle, owner) in batch.iter().zip(owners) {
                if owner.is_some_and(|owner| owner != *own) {
                    handle.mark_moved();
                }
            }
        }
        let done = !handles.is_empty()
            && handles.iter().all(|handle| {
                handle.has_moved() && handle.pending_exchanges() == 0 && handle.open_channels() == 0
            });
        if done {
            return;
        }
    }
}
