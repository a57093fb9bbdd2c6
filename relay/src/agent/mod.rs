//! `relay agent`: the host agent. It keeps one tunnel open to a relay and forwards what
//! comes through it to a local service.
//!
//! # Layout
//! - [`config`]: flags, environment and validation ([`AgentArgs`] → [`AgentConfig`]).
//! - [`backoff`]: the pure reconnect policy (exponential, jittered, reset rules).
//! - [`retry_after`]: `Retry-After` parsing (delay-seconds and HTTP-date).
//! - [`tunnel`]: one tunnel connection: connect (negotiating the protocol), register,
//!   watchdogs.
//! - [`v1`]: serving a v1 tunnel (JSON messages, bodies whole).
//! - [`h2`]: serving an `h2` tunnel (an HTTP/2 server in front of the local service);
//!   `streams`: its connections and their streams, served from the connection's task.
//! - [`upstream`]: the local service: pooled HTTP exchanges and WebSocket upgrades.
//! - [`status`]: the operator status, its log lines and its HTTP endpoint.
//!
//! # The run loop
//! [`run`] owns the reconnect state. It starts one connect attempt at a time (the
//! *current* tunnel, each with a new generation number), and reacts to what tunnels
//! report:
//! - registered: status `connected`; after `--stable-after` the backoff starts over;
//! - ended or refused: the end is classified ([`classify`]) into a backoff
//!   [`Outcome`], the next relay URL is picked, and the next attempt is scheduled;
//! - drain (make before break): the current tunnel becomes a *draining* one that keeps
//!   serving its in-flight work, and a new tunnel is opened after a short random delay
//!   (to the next URL when there are several). A draining tunnel closes itself once idle
//!   and replaced by a registered newer one, or when its relay closes it. Only the
//!   current tunnel counts for reconnecting.
//!
//! On shutdown every tunnel closes with 1000, within [`SHUTDOWN_GRACE`].

pub mod backoff;
pub mod config;
pub mod h2;
pub mod retry_after;
pub mod status;
mod streams;
pub mod tunnel;
pub mod upstream;
pub mod v1;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use self::backoff::{Backoff, Jitter, Outcome};
use self::config::RelayUrl;
pub use self::config::{AgentArgs, AgentConfig};
use self::status::StatusHandle;
use self::tunnel::{ConnectError, EndCause, Event, TunnelEnd};
use self::upstream::Upstream;
use crate::limits::agent::{MAX_DRAINING_TUNNELS, SHUTDOWN_GRACE};
use crate::protocol::close_code;

/// Runs the agent until `shutdown` resolves, then closes every tunnel with 1000.
///
/// # Errors
/// Only when the status endpoint cannot be bound: every relay or upstream failure is
/// retried, never returned.
///
/// # Cancel safety
/// Not cancel safe (tunnels would be dropped without a Close frame): resolve `shutdown`.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // wss:// needs a crypto provider; ring is the only one compiled in. Installing twice
    // (tests, embedding) is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let first_relay = config.relays[0].to_string();
    let status = StatusHandle::new(config.host_id.clone(), &first_relay);
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let Some(addr) = config.status_addr {
        let listener = status::bind(addr).await?;
        let (status, cancel) = (status.clone(), root.child_token());
        tasks.spawn(async move {
            if let Err(err) = status::serve(listener, status, cancel).await {
                error!("{err:#}");
            }
        });
    }
    info!(
        host = %config.host_id,
        relays = %config.relays.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        upstream = %config.upstream,
        token = %config.token,
        "agent starting"
    );
    let supervisor = Supervisor::new(config, status, Jitter::random(), tasks, root);
    supervisor.run(shutdown).await;
    Ok(())
}

/// The current tunnel: the one the reconnect policy is about.
#[derive(Debug)]
struct Current {
    generation: u64,
    /// Its task, to recognize it if it panics.
    task: tokio::task::Id,
    relay: usize,
    cancel: CancellationToken,
    registered_at: Option<Instant>,
    /// `--stable-after` has passed since registration (the backoff was reset).
    stable: bool,
}

/// An old tunnel finishing its work after a drain.
#[derive(Debug)]
struct Draining {
    generation: u64,
    task: tokio::task::Id,
    cancel: CancellationToken,
}

/// The run loop's state.
struct Supervisor {
    shared: Arc<tunnel::Shared>,
    relays: Vec<RelayUrl>,
    /// Index of the relay URL for the next attempt.
    next_relay: usize,
    backoff: Backoff,
    max_retry_after: Duration,
    stable_after: Duration,
    generation: u64,
    current: Option<Current>,
    /// Bounded by [`MAX_DRAINING_TUNNELS`]: the oldest is closed to make room.
    draining: VecDeque<Draining>,
    /// Every tunnel task, current and draining, with its generation.
    tunnels: JoinSet<(u64, TunnelEnd)>,
    /// Tunnel events. Unbounded, but bounded by construction: a tunnel sends at most one
    /// `Registered` and one `Drain` in its life.
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// Generation of the newest registered tunnel (draining tunnels wait for a newer one).
    newest: watch::Sender<u64>,
    next_attempt: Option<Instant>,
    root: CancellationToken,
    /// What the last registration line said (relay index, protocol): printed again only
    /// when it changes.
    announced: Option<(usize, &'static str)>,
}

// === impl Supervisor ===

impl Supervisor {
    fn new(
        config: AgentConfig,
        status: StatusHandle,
        jitter: Jitter,
        tasks: TaskTracker,
        root: CancellationToken,
    ) -> Supervisor {
        let shared = Arc::new(tunnel::Shared {
            host_id: config.host_id,
            token: config.token,
            upstream: Arc::new(Upstream::new(config.upstream)),
            status,
            connect_timeout: config.connect_timeout,
            silence_timeout: config.silence_timeout,
            tls: config.ca.as_deref().map(crate::tls::client_config),
            tasks,
            protocol: config.protocol,
            v1_only: std::sync::Mutex::default(),
            answer_budget: crate::limits::agent::ANSWER_BUDGET,
        });
        // Unbounded but bounded by construction: each tunnel sends at most one
        // `Registered` and one `Drain` (both guarded in the session), and the agent holds
        // at most one current tunnel plus a few draining ones. An unbounded sender also
        // never makes a session wait on the run loop.
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Supervisor {
            shared,
            relays: config.relays,
            next_relay: 0,
            backoff: Backoff::new(config.backoff, jitter),
            max_retry_after: config.max_retry_after,
            stable_after: config.backoff.stable_after,
            generation: 0,
            current: None,
            draining: VecDeque::new(),
            tunnels: JoinSet::new(),
            events_tx,
            events_rx,
            newest: watch::Sender::new(0),
            next_attempt: None,
            root,
            announced: None,
        }
    }

    fn status(&self) -> &StatusHandle {
        &self.shared.status
    }

    async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.connect_now();
        loop {
            let stable_at = self
                .current
                .as_ref()
                .filter(|c| !c.stable)
                .and_then(|c| c.registered_at)
                .map(|at| at + self.stable_after);
            tokio::select! {
                () = &mut shutdown => break,
                Some(event) = self.events_rx.recv() => self.on_event(event),
                Some(joined) = self.tunnels.join_next(), if !self.tunnels.is_empty() => {
                    match joined {
                        Ok((generation, end)) => self.on_end(generation, end),
                        Err(err) => self.on_panic(err),
                    }
                }
                () = sleep_until(self.next_attempt.unwrap_or_else(Instant::now)), if self.next_attempt.is_some() => {
                    self.next_attempt = None;
                    self.connect_now();
                }
                () = sleep_until(stable_at.unwrap_or_else(Instant::now)), if stable_at.is_some() => {
                    if let Some(current) = &mut self.current {
                        current.stable = true;
                    }
                    self.backoff.mark_stable();
                    self.status().stable();
                }
            }
        }
        self.shutdown().await;
    }

    /// Closes every tunnel (1000), waits for them and their work within
    /// [`SHUTDOWN_GRACE`], then gives up on what is left.
    async fn shutdown(mut self) {
        info!("shutting down: closing tunnels");
        self.root.cancel();
        let tasks = self.shared.tasks.clone();
        tasks.close();
        let waited = timeout(SHUTDOWN_GRACE, async {
            while self.tunnels.join_next().await.is_some() {}
            tasks.wait().await;
        })
        .await;
        if waited.is_err() {
            warn!("shutdown grace of {SHUTDOWN_GRACE:?} over; abandoning what is left");
            self.tunnels.abort_all();
        }
        self.status().stopped();
    }

    /// Starts a connect attempt to the next relay URL.
    fn connect_now(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        let index = self.next_relay;
        let relay = self.relays[index].clone();
        self.status().connecting(&relay.to_string());
        let cancel = self.root.child_token();
        let shared = self.shared.clone();
        let events = self.events_tx.clone();
        let newest = self.newest.subscribe();
        let tunnel_cancel = cancel.clone();
        let task = self.tunnels.spawn(async move {
            let end = tunnel::run(shared, generation, relay, events, newest, tunnel_cancel).await;
            (generation, end)
        });
        self.current = Some(Current {
            generation,
            task: task.id(),
            relay: index,
            cancel,
            registered_at: None,
            stable: false,
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Registered {
                generation,
                protocol,
                base_domain,
            } => {
                let Some(current) = self.current.as_mut().filter(|c| c.generation == generation)
                else {
                    return;
                };
                current.registered_at = Some(Instant::now());
                let index = current.relay;
                let relay = self.relays[index].to_string();
                self.newest.send_if_modified(|newest| {
                    let newer = generation > *newest;
                    if newer {
                        *newest = generation;
                    }
                    newer
                });
                self.status().connected(&relay, protocol.as_str());
                let said = (index, protocol.as_str());
                if self.announced != Some(said) {
                    self.announced = Some(said);
                    let relay = &self.relays[index];
                    let mut url = relay.public_url(&self.shared.host_id);
                    if let Some(root) = base_domain
                        .as_deref()
                        .and_then(|base| relay.subdomain_url(&self.shared.host_id, base))
                    {
                        url = format!("{url} and {root}");
                    }
                    announce(&format!(
                        "relay agent: {} is reachable at {url} (tunnel protocol {}, to {})",
                        self.shared.host_id,
                        protocol.as_str(),
                        self.shared.upstream.url()
                    ));
                }
            }
            Event::Drain { generation, reason } => {
                let Some(current) = self.current.take_if(|c| c.generation == generation) else {
                    return;
                };
                debug!(
                    generation,
                    reason = reason.as_deref().unwrap_or(""),
                    "tunnel draining"
                );
                let registered_for = current.registered_at.map(|at| at.elapsed());
                self.draining.push_back(Draining {
                    generation,
                    task: current.task,
                    cancel: current.cancel,
                });
                if self.draining.len() > MAX_DRAINING_TUNNELS
                    && let Some(oldest) = self.draining.pop_front()
                {
                    warn!("more than {MAX_DRAINING_TUNNELS} draining tunnels; closing the oldest");
                    oldest.cancel.cancel();
                }
                self.status().draining_tunnels(self.draining.len());
                let delay = self.backoff.next_delay(Outcome::Drained, registered_for);
                self.schedule(current.relay, delay, None);
            }
        }
    }

    fn on_end(&mut self, generation: u64, end: TunnelEnd) {
        let Some(current) = self.current.take_if(|c| c.generation == generation) else {
            // A draining tunnel finished.
            self.draining.retain(|d| d.generation != generation);
            self.status().draining_tunnels(self.draining.len());
            debug!(generation, ?end, "draining tunnel closed");
            return;
        };
        let relay = self.relays[current.relay].to_string();
        let (registered_for, outcome, error) =
            classify(&end, &relay, self.max_retry_after, SystemTime::now());
        let Some(outcome) = outcome else {
            return; // shutting down
        };
        self.log_end(&outcome, &error, registered_for.is_some());
        let delay = self.backoff.next_delay(outcome, registered_for);
        self.schedule(current.relay, delay, error);
    }

    /// A tunnel task panicked (a bug): treat it as a lost tunnel.
    fn on_panic(&mut self, err: tokio::task::JoinError) {
        error!(%err, "a tunnel task failed");
        let task = err.id();
        let Some(current) = self.current.take_if(|c| c.task == task) else {
            self.draining.retain(|d| d.task != task);
            self.status().draining_tunnels(self.draining.len());
            return;
        };
        let registered_for = current.registered_at.map(|at| at.elapsed());
        let delay = self.backoff.next_delay(Outcome::Failed, registered_for);
        self.schedule(
            current.relay,
            delay,
            Some(format!("tunnel task failed: {err}")),
        );
    }

    /// Logs why the current tunnel ended, at the level its cause deserves.
    fn log_end(&self, outcome: &Outcome, error: &Option<String>, was_registered: bool) {
        let error = error.as_deref().unwrap_or("");
        match outcome {
            Outcome::AuthFailed => error!(
                token = %self.shared.token,
                host = %self.shared.host_id,
                error,
                "the relay refused the host token: the credential is the problem \
                 (check the token {}, its expiry and that it lists this hostId); retrying slowly",
                self.shared.token
            ),
            Outcome::Replaced => warn!(
                host = %self.shared.host_id,
                error,
                "another agent registered this hostId and replaced this tunnel; backing off to the cap"
            ),
            Outcome::Drained => info!(error, "relay closed the tunnel for a drain"),
            Outcome::TryElsewhere if self.relays.len() > 1 => {
                info!(error, "relay is draining; trying another one");
            }
            Outcome::TryElsewhere => info!(error, "relay is draining; trying it again shortly"),
            Outcome::Throttled { .. } => warn!(error, "relay asked to retry later"),
            Outcome::Failed if was_registered => warn!(error, "tunnel lost"),
            Outcome::Failed => warn!(error, "cannot connect"),
        }
    }

    /// Schedules the next attempt in `delay`, to the relay after `after` (several URLs
    /// rotate after every failure and drain; one URL is simply tried again).
    fn schedule(&mut self, after: usize, delay: Duration, error: Option<String>) {
        self.next_relay = (after + 1) % self.relays.len();
        self.next_attempt = Some(Instant::now() + delay);
        let relay = self.relays[self.next_relay].to_string();
        let failures = self.backoff.consecutive_failures();
        self.shared
            .status
            .backing_off(&relay, delay, failures, error);
    }
}

/// An error and its sources on one line, for logs and the status. A source whose text
/// its parent already shows (tungstenite's and hyper's errors often embed it) is skipped.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let more = err.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = err.source();
    }
    text
}

/// Classifies how a tunnel ended: how long it was registered, the backoff [`Outcome`]
/// (`None` when the agent is shutting down), and the error text for the status.
pub fn classify(
    end: &TunnelEnd,
    relay: &str,
    max_retry_after: Duration,
    now: SystemTime,
) -> (Option<Duration>, Option<Outcome>, Option<String>) {
    match end {
        TunnelEnd::NotOpened(ConnectError::Cancelled) => (None, None, None),
        TunnelEnd::NotOpened(err @ ConnectError::Token(_)) => {
            (None, Some(Outcome::AuthFailed), Some(err.to_string()))
        }
        TunnelEnd::NotOpened(
            err @ ConnectError::Http {
                status,
                retry_after,
                ..
            },
        ) => {
            let outcome = match status {
                401 | 403 => Outcome::AuthFailed,
                429 | 503 => {
                    let parsed = retry_after
                        .as_deref()
                        .and_then(|v| retry_after::parse(v, now, max_retry_after));
                    match parsed {
                        Some(Duration::ZERO) if *status == 503 => Outcome::TryElsewhere,
                        parsed => Outcome::Throttled {
                            retry_after: parsed.unwrap_or_default(),
                        },
                    }
                }
                _ => Outcome::Failed,
            };
            let text = match outcome {
                Outcome::Throttled { retry_after } if !retry_after.is_zero() => {
                    format!("{err}, retry after {} s", retry_after.as_secs())
                }
                Outcome::TryElsewhere => format!("{err}, retry after 0 s (relay draining)"),
                _ => err.to_string(),
            };
            (None, Some(outcome), Some(text))
        }
        TunnelEnd::NotOpened(err) => (None, Some(Outcome::Failed), Some(err.to_string())),
        TunnelEnd::Ended {
            registered_for,
            cause,
        } => {
            let outcome = match cause {
                EndCause::Shutdown => return (*registered_for, None, None),
                EndCause::RelayClosed {
                    code: Some(close_code::POLICY),
                    ..
                } => Outcome::AuthFailed,
                EndCause::RelayClosed {
                    code: Some(close_code::REPLACED),
                    ..
                } => Outcome::Replaced,
                EndCause::RelayClosed {
                    code: Some(close_code::DRAINING),
                    ..
                }
                | EndCause::Drained => Outcome::Drained,
                EndCause::RelayClosed { .. } | EndCause::Silence(_) | EndCause::Transport(_) => {
                    Outcome::Failed
                }
            };
            let text = format!("tunnel to {relay}: {cause}");
            (*registered_for, Some(outcome), Some(text))
        }
    }
}

/// Prints one line on stdout for whoever started the agent. A closed stdout (`relay agent
/// … | head -1`) is ignored: the agent serves on, and logs go to stderr anyway.
fn announce(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::config::TokenError;

    const MAX: Duration = Duration::from_secs(3600);

    fn http(status: u16, retry_after: Option<&str>) -> TunnelEnd {
        TunnelEnd::NotOpened(ConnectError::Http {
            url: "ws://r/tunnel?hostId=h".into(),
            status,
            retry_after: retry_after.map(str::to_owned),
        })
    }

    fn closed(code: u16, registered: Option<u64>) -> TunnelEnd {
        TunnelEnd::Ended {
            registered_for: registered.map(Duration::from_secs),
            cause: EndCause::RelayClosed {
                code: Some(code),
                reason: String::new(),
            },
        }
    }

    fn outcome(end: &TunnelEnd) -> Option<Outcome> {
        classify(end, "ws://r", MAX, SystemTime::now()).1
    }

    #[test]
    fn upgrade_statuses() {
        assert_eq!(outcome(&http(401, None)), Some(Outcome::AuthFailed));
        assert_eq!(outcome(&http(403, None)), Some(Outcome::AuthFailed));
        assert_eq!(outcome(&http(404, None)), Some(Outcome::Failed));
        assert_eq!(outcome(&http(502, Some("5"))), Some(Outcome::Failed));
        assert_eq!(
            outcome(&http(429, Some("30"))),
            Some(Outcome::Throttled {
                retry_after: Duration::from_secs(30)
            })
        );
        assert_eq!(outcome(&http(503, Some("0"))), Some(Outcome::TryElsewhere));
        // 429 with 0, 503 without the header or with junk: plain backoff, not "elsewhere".
        let zero = Some(Outcome::Throttled {
            retry_after: Duration::ZERO,
        });
        assert_eq!(outcome(&http(429, Some("0"))), zero);
        assert_eq!(outcome(&http(503, None)), zero);
        assert_eq!(outcome(&http(503, Some("later"))), zero);
        assert_eq!(
            outcome(&http(503, Some("999999"))),
            Some(Outcome::Throttled { retry_after: MAX })
        );
    }

    #[test]
    fn error_text_says_what_and_when() {
        let (_, _, text) = classify(&http(429, Some("30")), "ws://r", MAX, SystemTime::now());
        assert_eq!(
            text.as_deref(),
            Some("HTTP 429 from ws://r/tunnel?hostId=h, retry after 30 s")
        );
    }

    #[test]
    fn close_codes() {
        assert_eq!(outcome(&closed(1008, None)), Some(Outcome::AuthFailed));
        assert_eq!(outcome(&closed(4002, Some(60))), Some(Outcome::Replaced));
        assert_eq!(outcome(&closed(4001, Some(60))), Some(Outcome::Drained));
        for code in [1000, 1001, 1009, 1011, 4999] {
            assert_eq!(
                outcome(&closed(code, Some(1))),
                Some(Outcome::Failed),
                "{code}"
            );
        }
        let silence = TunnelEnd::Ended {
            registered_for: Some(Duration::from_secs(100)),
            cause: EndCause::Silence(Duration::from_secs(75)),
        };
        let (lived, outcome, _) = classify(&silence, "ws://r", MAX, SystemTime::now());
        assert_eq!(
            (lived, outcome),
            (Some(Duration::from_secs(100)), Some(Outcome::Failed))
        );
    }

    #[test]
    fn token_problems_are_auth_failures_and_shutdown_is_nothing() {
        let end = TunnelEnd::NotOpened(ConnectError::Token(TokenError::Empty("file /t".into())));
        assert_eq!(outcome(&end), Some(Outcome::AuthFailed));
        assert_eq!(
            outcome(&TunnelEnd::NotOpened(ConnectError::Cancelled)),
            None
        );
        let end = TunnelEnd::Ended {
            registered_for: None,
            cause: EndCause::Shutdown,
        };
        assert_eq!(outcome(&end), None);
    }
}

/// The run loop against in-process fake relays (real sockets, real time: paused time does
/// not mix with real I/O, so the durations are short instead).
#[cfg(test)]
mod run_loop_tests {
    use super::backoff::Policy;
    use super::config::{TokenSource, UpstreamUrl};
    use super::*;
    use crate::host_id::HostId;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    const WAIT: Duration = Duration::from_secs(5);

    /// One tunnel as the fake relay saw it: the request line, the Authorization header,
    /// and the socket.
    struct Accepted {
        uri: String,
        auth: String,
        ws: WebSocketStream<TcpStream>,
    }

    /// A fake relay that upgrades every connection and hands it over.
    async fn spawn_fake_relay() -> (String, mpsc::UnboundedReceiver<Accepted>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut seen = (String::new(), String::new());
                // The signature is tungstenite's; its error type is not ours to shrink.
                #[allow(clippy::result_large_err)]
                let callback = |req: &Request, resp: Response| {
                    seen.0 = req.uri().to_string();
                    seen.1 = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    Ok(resp)
                };
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                    let _ = tx.send(Accepted {
                        uri: seen.0,
                        auth: seen.1,
                        ws,
                    });
                }
            }
        });
        (url, rx)
    }

    /// A fake relay that answers every upgrade with a fixed HTTP response.
    async fn spawn_refusing_relay(response: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        url
    }

    fn config(relays: &[String], token: TokenSource, base: Duration) -> AgentConfig {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = format!("http://{}", closed.local_addr().unwrap());
        AgentConfig {
            relays: relays.iter().map(|r| RelayUrl::parse(r).unwrap()).collect(),
            host_id: HostId::parse("demo").unwrap(),
            token,
            upstream: UpstreamUrl::parse(&upstream).unwrap(),
            // These stub relays speak v1 only.
            protocol: config::ProtocolChoice::V1,
            status_addr: None,
            backoff: Policy {
                base,
                cap: base * 4,
                auth_cap: base * 8,
                drain_spread: Duration::from_millis(20),
                stable_after: Duration::from_secs(10),
                relays: relays.len() as u32,
            },
            connect_timeout: Duration::from_secs(2),
            silence_timeout: Duration::from_secs(75),
            ca: None,
            max_retry_after: Duration::from_secs(3600),
            log_format: crate::telemetry::LogFormat::Text,
        }
    }

    /// Starts the run loop; returns its status, the shutdown trigger and the task.
    fn spawn_agent(
        config: AgentConfig,
    ) -> (
        StatusHandle,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let status = StatusHandle::new(config.host_id.clone(), "");
        let supervisor = Supervisor::new(
            config,
            status.clone(),
            Jitter::fixed(1.0),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(supervisor.run(async {
            let _ = stopped.await;
        }));
        (status, stop, task)
    }

    async fn next_text(ws: &mut WebSocketStream<TcpStream>) -> String {
        loop {
            match timeout(WAIT, ws.next()).await.expect("a frame in time") {
                Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
                Some(Ok(Message::Close(frame))) => panic!("closed: {frame:?}"),
                Some(Ok(_)) => {}
                other => panic!("socket ended: {other:?}"),
            }
        }
    }

    async fn expect_close(ws: &mut WebSocketStream<TcpStream>) -> Option<u16> {
        loop {
            match timeout(WAIT, ws.next()).await.expect("a close in time") {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("no Close frame: {other:?}"),
            }
        }
    }

    async fn accept(rx: &mut mpsc::UnboundedReceiver<Accepted>) -> Accepted {
        timeout(WAIT, rx.recv())
            .await
            .expect("a connection in time")
            .expect("fake relay running")
    }

    #[tokio::test]
    async fn make_before_break_on_drain() {
        let (url, mut accepted) = spawn_fake_relay().await;
        let token = TokenSource::Inline("tok".parse().unwrap());
        let (status, stop, task) = spawn_agent(config(&[url], token, Duration::from_secs(1)));

        let mut old = accept(&mut accepted).await;
        assert_eq!(old.uri, "/tunnel?hostId=demo");
        assert_eq!(old.auth, "Bearer tok");
        old.ws
            .send(Message::Text(
                r#"{"type":"drain","reason":"deploy"}"#.into(),
            ))
            .await
            .unwrap();

        // A new tunnel opens at once (within the 20 ms drain spread)...
        let mut new = accept(&mut accepted).await;
        // ...while the old one still serves.
        old.ws
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .unwrap();
        assert_eq!(next_text(&mut old.ws).await, r#"{"type":"pong"}"#);
        // Once the new one is registered (200 ms), the idle old one closes with 1000.
        assert_eq!(expect_close(&mut old.ws).await, Some(1000));
        assert_eq!(status.report().state, status::State::Connected);
        assert_eq!(status.report().consecutive_failures, 0);

        new.ws
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .unwrap();
        assert_eq!(next_text(&mut new.ws).await, r#"{"type":"pong"}"#);
        stop.send(()).unwrap();
        assert_eq!(expect_close(&mut new.ws).await, Some(1000));
        timeout(WAIT, task).await.unwrap().unwrap();
        assert_eq!(status.report().state, status::State::Stopped);
    }

    #[tokio::test]
    async fn draining_relay_sends_the_agent_to_the_next_url_without_backoff() {
        let draining = spawn_refusing_relay(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let (url, mut accepted) = spawn_fake_relay().await;
        let token = TokenSource::Inline("tok".parse().unwrap());
        // A 10 s base: only "try elsewhere" can make the second attempt come this soon.
        let started = Instant::now();
        let (status, stop, task) = spawn_agent(config(
            &[draining.clone(), url.clone()],
            token,
            Duration::from_secs(10),
        ));
        let mut tunnel = accept(&mut accepted).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let report = status.report();
        assert_eq!(
            report.consecutive_failures, 0,
            "a draining relay's refusal is no failure of the agent's"
        );
        assert!(
            report.last_error.as_deref().unwrap().contains("HTTP 503"),
            "{report:?}"
        );
        stop.send(()).unwrap();
        assert_eq!(expect_close(&mut tunnel.ws).await, Some(1000));
        timeout(WAIT, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn rotates_after_each_failure_and_rereads_the_token_file() {
        let (url_a, mut accepted_a) = spawn_fake_relay().await;
        let (url_b, mut accepted_b) = spawn_fake_relay().await;
        let dir = std::env::temp_dir().join(format!("relay-agent-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let (status, stop, task) = spawn_agent(config(
            &[url_a, url_b],
            TokenSource::File(path.clone()),
            Duration::from_millis(50),
        ));

        let mut a = accept(&mut accepted_a).await;
        assert_eq!(a.auth, "Bearer first");
        // The relay refuses the credential: the agent moves to B with the new token.
        std::fs::write(&path, "second\n").unwrap();
        a.ws.send(Message::Close(Some(CloseFrame {
            code: 1008.into(),
            reason: "token expired".into(),
        })))
        .await
        .unwrap();
        let mut b = accept(&mut accepted_b).await;
        assert_eq!(b.auth, "Bearer second");
        assert!(status.report().last_error.unwrap().contains("1008"));
        // B drops the connection: back to A.
        drop(b.ws.close(None).await);
        let mut a = accept(&mut accepted_a).await;
        assert_eq!(a.uri, "/tunnel?hostId=demo");

        stop.send(()).unwrap();
        assert_eq!(expect_close(&mut a.ws).await, Some(1000));
        timeout(WAIT, task).await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
