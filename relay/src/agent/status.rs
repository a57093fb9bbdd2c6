//! The operator's view of the agent: its state, the relay it uses, its failures.
//!
//! Every change is logged at INFO (these are the lines operators and tests watch:
//! `connecting`, `tunnel registered relay=...`, `reconnecting in 1.2s`), and the current
//! value is served as JSON at `GET /status` (and `/`) when `--status-addr` is set.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::host_id::HostId;

/// What the agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A connect attempt is under way (no registered tunnel).
    Connecting,
    /// The current tunnel is registered.
    Connected,
    /// Waiting before the next attempt.
    BackingOff,
    /// Shut down.
    Stopped,
}

/// The status as served at `GET /status`. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// The hostId this agent registers.
    pub host_id: String,
    /// What the agent is doing.
    pub state: State,
    /// The relay URL connected to, being tried, or to be tried next.
    pub relay: String,
    /// Failed attempts since the last tunnel that stayed up for `--stable-after`.
    pub consecutive_failures: u32,
    /// What went wrong last, e.g. `HTTP 429 from ws://x/tunnel, retry after 30 s`.
    pub last_error: Option<String>,
    /// When backing off: milliseconds until the next attempt.
    pub next_attempt_in_ms: Option<u64>,
    /// When backing off: when the next attempt starts.
    pub next_attempt_at: Option<String>,
    /// When a tunnel last registered.
    pub last_connected_at: Option<String>,
    /// When the agent last heard from a relay on a registered tunnel (any frame).
    pub last_success_at: Option<String>,
    /// When the current tunnel registered (while connected).
    pub connected_since: Option<String>,
    /// The protocol the current tunnel speaks (`"v1"` or `"h2"`, while connected).
    pub protocol: Option<&'static str>,
    /// Old tunnels still finishing their work after a drain.
    pub draining_tunnels: usize,
}

#[derive(Debug)]
struct Inner {
    host_id: HostId,
    state: State,
    relay: String,
    consecutive_failures: u32,
    last_error: Option<String>,
    next_attempt: Option<Instant>,
    last_connected_at: Option<SystemTime>,
    last_success_at: Option<SystemTime>,
    connected_since: Option<SystemTime>,
    protocol: Option<&'static str>,
    draining_tunnels: usize,
}

/// A shared handle on the agent's status. Cheap to clone; every method is synchronous
/// and holds the lock for a few field writes (std `Mutex`: never held across an await).
#[derive(Debug, Clone)]
pub struct StatusHandle(Arc<Mutex<Inner>>);

// === impl StatusHandle ===

impl StatusHandle {
    /// The status of an agent about to connect to `relay`.
    pub fn new(host_id: HostId, relay: &str) -> StatusHandle {
        StatusHandle(Arc::new(Mutex::new(Inner {
            host_id,
            state: State::Connecting,
            relay: relay.to_owned(),
            consecutive_failures: 0,
            last_error: None,
            next_attempt: None,
            last_connected_at: None,
            last_success_at: None,
            connected_since: None,
            protocol: None,
            draining_tunnels: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connect attempt to `relay` starts.
    pub fn connecting(&self, relay: &str) {
        let mut s = self.lock();
        s.state = State::Connecting;
        s.relay = relay.to_owned();
        s.next_attempt = None;
        s.connected_since = None;
        info!(state = "connecting", relay = %s.relay, consecutive_failures = s.consecutive_failures, "connecting");
    }

    /// The current tunnel, to `relay`, is registered and speaks `protocol`.
    pub fn connected(&self, relay: &str, protocol: &'static str) {
        let now = SystemTime::now();
        let mut s = self.lock();
        s.state = State::Connected;
        s.protocol = Some(protocol);
        s.relay = relay.to_owned();
        s.next_attempt = None;
        s.connected_since = Some(now);
        s.last_connected_at = Some(now);
        s.last_success_at = Some(now);
        info!(state = "connected", relay = %s.relay, protocol, consecutive_failures = s.consecutive_failures, "tunnel registered");
    }

    /// The next attempt, to `relay`, starts in `delay`; `error` says why the last one
    /// ended (`None` for a drain, which is not an error).
    pub fn backing_off(
        &self,
        relay: &str,
        delay: Duration,
        consecutive_failures: u32,
        error: Option<String>,
    ) {
        let mut s = self.lock();
        s.state = State::BackingOff;
        s.relay = relay.to_owned();
        s.next_attempt = Some(Instant::now() + delay);
        s.connected_since = None;
        s.consecutive_failures = consecutive_failures;
        if error.is_some() {
            s.last_error = error;
        }
        // Milliseconds are plenty for a log line.
        let shown = Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        info!(
            state = "backing_off",
            relay = %s.relay,
            consecutive_failures,
            last_error = s.last_error.as_deref().unwrap_or(""),
            delay_ms = shown.as_millis() as u64,
            "reconnecting in {shown:?}"
        );
    }

    /// The current tunnel stayed up for `--stable-after`: the failure count starts over.
    pub fn stable(&self) {
        let mut s = self.lock();
        if s.consecutive_failures != 0 {
            s.consecutive_failures = 0;
            info!(state = "connected", relay = %s.relay, consecutive_failures = 0, "tunnel stable; backoff reset");
        }
    }

    /// `n` old tunnels are finishing their work after a drain.
    pub fn draining_tunnels(&self, n: usize) {
        let mut s = self.lock();
        if s.draining_tunnels != n {
            s.draining_tunnels = n;
            info!(draining_tunnels = n, "draining tunnels changed");
        }
    }

    /// The agent shut down.
    pub fn stopped(&self) {
        let mut s = self.lock();
        s.state = State::Stopped;
        s.next_attempt = None;
        s.connected_since = None;
        info!(state = "stopped", relay = %s.relay, "agent stopped");
    }

    /// A frame arrived on a registered tunnel: proof the path works. Not logged (it happens
    /// on every frame).
    pub fn heard_from_relay(&self) {
        self.lock().last_success_at = Some(SystemTime::now());
    }

    /// The status now.
    pub fn report(&self) -> StatusReport {
        let s = self.lock();
        let rfc3339 = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let remaining = s
            .next_attempt
            .map(|at| at.saturating_duration_since(Instant::now()));
        StatusReport {
            host_id: s.host_id.to_string(),
            state: s.state,
            relay: s.relay.clone(),
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error.clone(),
            next_attempt_in_ms: remaining.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            next_attempt_at: remaining.map(|d| rfc3339(SystemTime::now() + d)),
            last_connected_at: s.last_connected_at.map(rfc3339),
            last_success_at: s.last_success_at.map(rfc3339),
            connected_since: s.connected_since.map(rfc3339),
            protocol: s.protocol.filter(|_| s.state == State::Connected),
            draining_tunnels: s.draining_tunnels,
        }
    }
}

/// The status endpoint: `GET /status` and `GET /`.
pub fn app(status: StatusHandle) -> Router {
    let handler = move || {
        let status = status.clone();
        async move { axum::Json(status.report()) }
    };
    Router::new()
        .route("/status", get(handler.clone()))
        .route("/", get(handler))
}

/// Binds the status endpoint on `addr`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --status-addr {addr}"))?;
    if let Ok(bound) = listener.local_addr() {
        info!(addr = %bound, "status endpoint listening");
    }
    Ok(listener)
}

/// Serves the status endpoint on `listener` until `cancel` fires.
///
/// # Errors
/// When accepting connections fails for good.
pub async fn serve(
    listener: TcpListener,
    status: StatusHandle,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, app(status))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .context("status endpoint failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> StatusHandle {
        StatusHandle::new(HostId::parse("demo").unwrap(), "ws://a")
    }

    #[tokio::test(start_paused = true)]
    async fn backing_off_reports_the_next_attempt() {
        let status = handle();
        status.backing_off(
            "ws://b",
            Duration::from_secs(30),
            3,
            Some("HTTP 429 from ws://b/tunnel, retry after 30 s".into()),
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let report = status.report();
        assert_eq!(report.state, State::BackingOff);
        assert_eq!(report.relay, "ws://b");
        assert_eq!(report.consecutive_failures, 3);
        assert_eq!(report.next_attempt_in_ms, Some(20_000));
        assert!(report.next_attempt_at.is_some());
        assert!(report.last_error.as_deref().unwrap().contains("HTTP 429"));

        // A drain keeps the last error on record.
        status.backing_off("ws://a", Duration::ZERO, 3, None);
        assert!(status.report().last_error.is_some());

        status.connected("ws://a", "h2");
        let report = status.report();
        assert_eq!(report.state, State::Connected);
        assert_eq!(report.next_attempt_in_ms, None);
        assert!(report.connected_since.is_some() && report.last_connected_at.is_some());
        status.stable();
        assert_eq!(status.report().consecutive_failures, 0);
    }

    #[test]
    fn report_serializes_with_snake_case_state() {
        let status = handle();
        let json = serde_json::to_value(status.report()).unwrap();
        assert_eq!(json["state"], "connecting");
        assert_eq!(json["host_id"], "demo");
        assert!(json["next_attempt_in_ms"].is_null());
        status.stopped();
        assert_eq!(
            serde_json::to_value(status.report()).unwrap()["state"],
            "stopped"
        );
    }
}
