//! Logs and metrics: tracing setup, token redaction, and every metric the relay records.
//!
//! Tokens never reach a log line: the relay never logs headers, and every URI it logs goes
//! through [`redact_uri`] first.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use tokio::time::Instant;

use crate::limits::ERROR_LOG_INTERVAL;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber: level from `RUST_LOG` (default `info`), logs
/// on stderr so that stdout stays free for command output (tokens, status).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter =
        log_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

/// `env` (from `RUST_LOG`), with the libraries that log what crosses the wire at trace
/// level (tungstenite: the whole handshake request with its `Authorization`, and every
/// frame with its payload; hyper and h2: heads and frames) held below trace whatever it
/// asks: tokens, cookies and bodies never reach a log line, at any level.
///
/// The filter's most verbose level is `env`'s: that hint sets the process's global
/// level, and the `log` crate's, so that a `trace!` or `debug!` the filter would refuse
/// (tungstenite's, per frame, through `log`) is skipped at its call site by one
/// comparison instead of being built and offered to the filter. Without it the
/// combined filter had no hint, which meant every level: 2–3 % of the agent's CPU went
/// into dispatching `log` records only to drop them (BENCHMARKS.md, run 10).
fn log_filter<S>(env: EnvFilter) -> impl tracing_subscriber::layer::Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    let no_wire =
        filter_fn(|meta| *meta.level() != tracing::Level::TRACE || !is_wire_logging(meta.target()))
            .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE);
    env.and(no_wire)
}

/// Whether `target` (a module path) belongs to one of [`WIRE_LOGGING_LIBRARIES`].
fn is_wire_logging(target: &str) -> bool {
    WIRE_LOGGING_LIBRARIES.iter().any(|library| {
        target
            .strip_prefix(library)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Crates whose trace-level logs carry wire contents (see [`init_tracing`]).
const WIRE_LOGGING_LIBRARIES: [&str; 5] = [
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
];

/// Buckets of every latency histogram, in seconds: from a loopback hop (~100 µs) to the
/// exchange timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Histograms with buckets (not summaries), so they aggregate across machines.
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed (embedding); then this handle just
        // renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// A copy of `uri` safe to log: the value of every `token` query parameter is replaced.
///
/// ```
/// use relay::telemetry::redact_uri;
/// assert_eq!(redact_uri("/tunnel?hostId=a&token=eyJx.y.z"), "/tunnel?hostId=a&token=REDACTED");
/// assert_eq!(redact_uri("/hosts/a/x?%74oken=eyJx"), "/hosts/a/x?%74oken=REDACTED");
/// assert_eq!(redact_uri("/hosts/a/x"), "/hosts/a/x");
/// ```
pub fn redact_uri(uri: &str) -> String {
    let Some((path, query)) = uri.split_once('?') else {
        return uri.to_owned();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if crate::query::is_token_key(key) => format!("{key}=REDACTED"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", redacted.join("&"))
}

// === metrics ===

/// A host message was ignored (`malformed`, `unknown_type`, `unknown_id`, `binary`).
pub fn message_ignored(reason: &'static str) {
    metrics::counter!("relay_tunnel_messages_ignored_total", "reason" => reason).increment(1);
}

/// An HTTP/2 connection inside an `h2` tunnel `started` (its first stream asked for it)
/// or was `ended` (idle).
pub fn h2_connection(event: &'static str) {
    metrics::counter!("relay_h2_connections_total", "event" => event).increment(1);
}

/// A new connection was closed at once (`limit`: [`crate::limits::max_connections`]).
pub fn connection_refused(reason: &'static str) {
    metrics::counter!("relay_connections_refused_total", "reason" => reason).increment(1);
}

/// A connection was accepted (`1.0`) or ended (`-1.0`), upgraded ones included:
/// `relay_connections_open`, what counts against [`crate::limits::max_connections`].
pub fn connection_open(delta: f64) {
    metrics::gauge!("relay_connections_open").increment(delta);
}

/// A write to a peer made no progress for the write timeout and its connection was
/// dropped ([`crate::connections::WriteTimeout`]).
pub fn write_timed_out() {
    metrics::counter!("relay_write_timeouts_total").increment(1);
}

/// Bytes charged against the byte budgets changed by `delta`
/// (`relay_budget_bytes_in_use`, see [`crate::budget`]).
pub fn budget_in_use(delta: f64) {
    metrics::gauge!("relay_budget_bytes_in_use").increment(delta);
}

/// A buffer was refused because a byte budget was full: the request got 503, or the
/// channel was closed (`relay_budget_refusals_total{scope}`).
pub fn budget_refused(scope: crate::budget::Scope) {
    metrics::counter!("relay_budget_refusals_total", "scope" => scope.as_str()).increment(1);
}

/// A stale directory entry was repaired: `removed` (it named this machine, which holds
/// no tunnel for the host) or `taken_over` (it named a machine that said it no longer
/// holds the host, held here): `relay_stale_entries_total{action}`.
pub fn stale_entry(action: &'static str) {
    metrics::counter!("relay_stale_entries_total", "action" => action).increment(1);
}

/// A drained tunnel was closed with streams still open (after the wait for answers in
/// flight): they are cut, and the clients see a failed answer, a cut body or a closed
/// WebSocket. Counted (`relay_drain_cut_total{kind}`) and logged, so an operator can tell
/// a clean deploy from one that cut long downloads.
pub fn drain_cut(exchanges: usize, channels: usize) {
    if exchanges == 0 && channels == 0 {
        return;
    }
    metrics::counter!("relay_drain_cut_total", "kind" => "exchange").increment(exchanges as u64);
    metrics::counter!("relay_drain_cut_total", "kind" => "channel").increment(channels as u64);
    tracing::warn!(
        exchanges,
        channels,
        "drain cut streams still open at its deadline"
    );
}

/// A client channel was closed because its client read too slowly.
pub fn channel_overflow() {
    metrics::counter!("relay_channel_overflows_total").increment(1);
}

/// A tunnel registered.
pub fn tunnel_registered(protocol: &'static str) {
    metrics::counter!("relay_tunnel_registrations_total", "protocol" => protocol).increment(1);
    metrics::gauge!("relay_tunnels_connected", "protocol" => protocol).increment(1.0);
}

/// A tunnel speaking `protocol` ended, for `reason` (see
/// [`crate::tunnel::SessionEnd::label`]).
pub fn tunnel_unregistered(protocol: &'static str, reason: &'static str) {
    metrics::counter!(
        "relay_tunnel_unregistrations_total",
        "protocol" => protocol,
        "reason" => reason
    )
    .increment(1);
    metrics::gauge!("relay_tunnels_connected", "protocol" => protocol).decrement(1.0);
}

/// A request was refused for lack of authorization.
pub fn auth_failed(endpoint: &'static str, kind: &'static str) {
    metrics::counter!("relay_auth_failures_total", "endpoint" => endpoint, "reason" => kind)
        .increment(1);
}

/// Body bytes carried through tunnels, `to_host` or `from_host` (HTTP bodies and
/// WebSocket frames).
pub fn bytes(direction: &'static str, n: usize) {
    metrics::counter!("relay_bytes_total", "direction" => direction).increment(n as u64);
}

/// The routes of [`client_request`], in the order of its handle table.
const ROUTES: [&str; 5] = ["local", "proxy", "replay", "bridge", "none"];

/// The status classes of [`client_request`], in the order of its handle table.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The handles of the per-request metrics, looked up once: a lookup hashes the name and
/// labels and takes a shard lock of the registry, twice per request otherwise.
struct ClientRequestMetrics {
    /// `[route][class]`.
    requests: Vec<Vec<metrics::Counter>>,
    /// `[route]`.
    seconds: Vec<metrics::Histogram>,
}

/// Built at the first request, after the recorder is installed (handles taken before
/// would record nowhere).
static CLIENT_REQUEST_METRICS: std::sync::OnceLock<ClientRequestMetrics> =
    std::sync::OnceLock::new();

/// A client request finished with `status`, served by `route` (`local`, `proxy`,
/// `replay`, `bridge`, or `none` when refused before routing).
pub fn client_request(status: u16, route: &'static str, seconds: f64) {
    let class = match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    };
    let Some(route) = ROUTES.iter().position(|r| *r == route) else {
        metrics::counter!("relay_client_requests_total", "status" => CLASSES[class], "route" => route)
            .increment(1);
        metrics::histogram!("relay_client_request_seconds", "route" => route).record(seconds);
        return;
    };
    let handles = CLIENT_REQUEST_METRICS.get_or_init(|| ClientRequestMetrics {
        requests: ROUTES
            .iter()
            .map(|&route| {
                CLASSES
                    .iter()
                    .map(|&class| {
                        metrics::counter!(
                            "relay_client_requests_total",
                            "status" => class,
                            "route" => route
                        )
                    })
                    .collect()
            })
            .collect(),
        seconds: ROUTES
            .iter()
            .map(|&route| metrics::histogram!("relay_client_request_seconds", "route" => route))
            .collect(),
    });
    handles.requests[route][class].increment(1);
    handles.seconds[route].record(seconds);
}

/// A client WebSocket channel opened (+1) or closed (-1).
pub fn channel_open(delta: f64) {
    metrics::gauge!("relay_channels_open").increment(delta);
}

/// At most one log line per [`ERROR_LOG_INTERVAL`] for one kind of event that can come
/// by the thousand (every one is counted in a metric besides).
struct Throttle(Mutex<Option<(Instant, u64)>>);

impl Throttle {
    const fn new() -> Throttle {
        Throttle(Mutex::new(None))
    }

    /// `Some(suppressed)` when a line may be logged now (with how many were not since the
    /// last one), `None` when this one is suppressed.
    fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match last.as_mut() {
            Some((at, skipped)) if now.duration_since(*at) < ERROR_LOG_INTERVAL => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                *last = Some((now, 0));
                Some(0)
            }
        }
    }
}

/// `accept(2)` failed (out of file descriptors, most often): counted always, logged at
/// most once per [`ERROR_LOG_INTERVAL`] with how many were not.
pub fn accept_failed(err: &std::io::Error) {
    metrics::counter!("relay_accept_errors_total").increment(1);
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.allow() {
        tracing::warn!(%err, suppressed, "accept failed; backing off");
    }
}

/// A tunnel registration was refused (bad or missing token, bad hostId): counted by the
/// caller, logged at most once per [`ERROR_LOG_INTERVAL`] with how many were not, so a
/// flood of bad upgrades cannot flood the log.
pub fn tunnel_refused(peer: &dyn std::fmt::Display, reason: &dyn std::fmt::Display) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.allow() {
        tracing::info!(%peer, %reason, suppressed, "tunnel refused");
    }
}

/// A directory operation failed: counted always, logged at most once per
/// [`ERROR_LOG_INTERVAL`] per operation (with how many were not logged), so an outage
/// does not flood the logs. The relay carries on with what it holds locally.
pub fn directory_error(
    op: &'static str,
    subject: &dyn std::fmt::Display,
    err: &dyn std::fmt::Display,
) {
    metrics::counter!("relay_directory_errors_total", "op" => op).increment(1);
    static LAST: Mutex<Vec<(&'static str, Instant, u64)>> = Mutex::new(Vec::new());
    let now = Instant::now();
    let suppressed = {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match last.iter_mut().find(|(o, _, _)| *o == op) {
            Some((_, at, skipped)) if now.duration_since(*at) < ERROR_LOG_INTERVAL => {
                *skipped += 1;
                return;
            }
            Some((_, at, skipped)) => {
                *at = now;
                std::mem::take(skipped)
            }
            // Bounded: one entry per operation name.
            None => {
                last.push((op, now, 0));
                0
            }
        }
    };
    tracing::warn!(op, %subject, error = %err, suppressed, "directory operation failed; serving what is local");
}

/// A request was routed to another machine (`proxy` or `replay`), with its outcome.
pub fn hop(mode: &'static str, outcome: &'static str) {
    metrics::counter!("relay_hops_total", "mode" => mode, "outcome" => outcome).increment(1);
}

/// A request whose tunnel ended before writing it was routed again.
pub fn redelivered() {
    metrics::counter!("relay_requests_redelivered_total").increment(1);
}

/// A request for a moving host was held: `outcome` is `found` (the host registered
/// again in time), `timeout` or `full` (too many held already).
pub fn held(outcome: &'static str) {
    metrics::counter!("relay_held_requests_total", "outcome" => outcome).increment(1);
}

/// A superset v2 dial arrived: `outcome` is `paired`, `unknown_ticket` or `forwarded`
/// (issued by another machine).
pub fn dial(outcome: &'static str) {
    metrics::counter!("relay_v2_dials_total", "outcome" => outcome).increment(1);
}

/// The reconciler wrote `n` directory entries back.
pub fn reconciled(n: usize) {
    metrics::counter!("relay_reconcile_writes_total").increment(n as u64);
}

/// A drain ran to its end in `seconds`.
pub fn drained(seconds: f64) {
    metrics::counter!("relay_drain_runs_total").increment(1);
    metrics::histogram!("relay_drain_seconds").record(seconds);
}

/// A tunnel registration was refused by the admission control (429) or because the relay
/// is draining (`reason`).
pub fn admission_rejected(reason: &'static str) {
    metrics::counter!("relay_admission_rejections_total", "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::layer::Filter;

    use super::*;

    #[test]
    fn the_log_filter_is_no_more_verbose_than_rust_log_asks() {
        let filter = log_filter::<tracing_subscriber::Registry>(EnvFilter::new("info"));
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::INFO));
        let filter = log_filter::<tracing_subscriber::Registry>(EnvFilter::new("warn,relay=debug"));
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::DEBUG));
    }
}
