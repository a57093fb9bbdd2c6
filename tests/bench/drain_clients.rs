//! The client side of the drain benchmark: a fleet of lightweight v1 host agents in a
//! worker process (the bench re-runs its own executable with `DRAIN_BENCH_WORKER` set).
//!
//! Why a separate process: the hard `RLIMIT_NOFILE` of a container is often 20,000, and
//! 10,000 hosts that keep their old tunnel while opening the new one hold 20,000 sockets
//! at the peak. Each worker holds a shard (at most [`MAX_SHARD`] hosts).
//!
//! Each host:
//!
//! 1. opens a tunnel to its home relay (A) under a window of concurrent handshakes and
//!    waits for the relay's first `ping` (the tunnel is registered, directory included);
//! 2. answers every `ping` with `pong`;
//! 3. on `{"type":"drain"}` at once opens a NEW tunnel for the same hostId to its target
//!    (B for even host numbers, C for odd), make before break: the old tunnel stays open
//!    until the relay closes it (or, with `close_old_after_ms`, until that long after the
//!    new tunnel received its first message, as `relay agent` does with an idle tunnel:
//!    `limits::agent::DRAINED_TUNNEL_LINGER`). HTTP 429 on
//!    the upgrade is honoured: the host waits `Retry-After` (whole seconds) and tries the
//!    same relay again; any other failure is retried after [`RETRY_DELAY`];
//! 4. the re-home time is from the moment it read `drain` to the moment its new tunnel
//!    read its first message (the relay pings once the directory write is done).
//!
//! The worker talks to the bench in JSON lines: [`WorkerEvent`]s on stdout; it exits as
//! soon as its stdin is closed (the bench is done with it, or died).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The environment variable that turns the bench executable into a worker; its value is
/// the [`WorkerConfig`] as JSON.
pub const WORKER_ENV: &str = "DRAIN_BENCH_WORKER";

/// Most hosts one worker process holds (two sockets each at the peak).
pub const MAX_SHARD: usize = 5_000;

/// Wait after a failed connection attempt that is not a 429.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Bound on one TCP connect + WebSocket upgrade.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the whole fleet may take to register with its home relay.
const SETUP_DEADLINE: Duration = Duration::from_secs(120);

/// How long a registered tunnel may take to receive its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a host keeps trying to re-home after `drain`.
const REHOME_GIVE_UP: Duration = Duration::from_secs(30);

/// How long a worker waits for the first `drain` after it reported ready.
const DRAIN_WAIT: Duration = Duration::from_secs(120);

/// Bound on a close handshake the client side started.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Slack after the re-home deadline before the worker reports anyway.
const REPORT_SLACK: Duration = Duration::from_secs(1);

const PONG: &str = r#"{"type":"pong"}"#;

type Socket = WebSocketStream<TcpStream>;

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Register, then wait for `drain` and move to the targets.
    Drain,
    /// Register only (the registration-rate measurement).
    Register,
}

/// A worker's instructions, passed as JSON in [`WORKER_ENV`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub role: Role,
    /// Global number of this worker's first host (hostIds are `h00000`, `h00001`, ..).
    pub first: usize,
    /// Hosts in this worker.
    pub count: usize,
    /// The relay every host registers with first.
    pub home: SocketAddr,
    /// Where hosts move on `drain`: host `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// A host token valid for every hostId.
    pub token: String,
    /// Concurrent connection attempts (TCP connect + upgrade) during the setup.
    pub connect_window: usize,
    /// Close the old tunnel this many milliseconds after the new one received its first
    /// message (`relay agent` does so with an idle drained tunnel after
    /// `DRAINED_TUNNEL_LINGER`); `None` keeps it until the relay closes it.
    pub close_old_after_ms: Option<u64>,
    /// Hosts not re-homed within this long count as "never re-homed".
    pub rehome_deadline_ms: u64,
}

/// What a worker reports, one JSON line each on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerEvent {
    Ready(SetupReport),
    Drained(DrainReport),
}

/// The setup: every host registered with its home relay (or gave up).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SetupReport {
    pub registered: usize,
    pub failed: usize,
    /// Wall clock (µs since the epoch) of the first connection attempt.
    pub first_connect_us: u64,
    /// Wall clock of the last host reading its first `ping`.
    pub last_registered_us: u64,
    /// Per registered host: connection start to first `ping`, µs.
    pub latencies_us: Vec<u64>,
    /// Failed attempts (connect, upgrade, status) during the setup.
    pub failed_attempts: u64,
}

/// The drain as this worker's hosts saw it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DrainReport {
    /// Hosts that read `drain` on their old tunnel.
    pub drained: usize,
    /// Wall clock (µs since the epoch) of the first and last `drain` read.
    pub first_drain_us: u64,
    pub last_drain_us: u64,
    /// Per host: `drain` read to the new tunnel's first message, µs; `None` when not
    /// re-homed before the worker reported.
    pub rehome_us: Vec<Option<u64>>,
    /// Wall clock of the last re-home.
    pub last_rehome_us: u64,
    /// Upgrades refused with 429 (each honoured: wait `Retry-After`, try again).
    pub http_429: u64,
    /// The `Retry-After` values of those 429s, seconds → count.
    pub retry_after: BTreeMap<u64, u64>,
    /// Upgrades refused with another status, status → count.
    pub http_other: BTreeMap<u16, u64>,
    /// Connects or upgrades that failed without an HTTP status (refused, reset, timeout).
    pub transport_errors: u64,
    /// How the old tunnels ended: `4001`, `closed by host`, `eof`, .. → count.
    pub old_ends: BTreeMap<String, usize>,
    /// Wall clock of the last old tunnel ending.
    pub last_old_end_us: u64,
    /// Per host whose old tunnel ended before its new one was registered (or that never
    /// re-homed): how long it had no registered tunnel, µs (until the report for those
    /// that never re-homed).
    pub gaps_us: Vec<u64>,
}

/// Wall clock in µs since the epoch: comparable across the bench's processes.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Small buffers: thousands of idle tunnels per process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Why a connection attempt failed.
enum OpenError {
    /// The upgrade was answered with this status (and `Retry-After`, in seconds).
    Status(u16, Option<u64>),
    /// Connect, upgrade or timeout failure without a status.
    Transport,
}

/// Opens a v1 tunnel for `host_id` to `addr`.
async fn open(addr: SocketAddr, host_id: &str, token: &str) -> Result<Socket, OpenError> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| OpenError::Transport)?;
        let _ = tcp.set_nodelay(true);
        let mut request = format!("ws://{addr}/tunnel?hostId={host_id}")
            .into_client_request()
            .map_err(|_| OpenError::Transport)?;
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| OpenError::Transport)?;
        request.headers_mut().insert("authorization", bearer);
        match tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config())).await {
            Ok((socket, _)) => Ok(socket),
            Err(WsError::Http(response)) => {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                Err(OpenError::Status(response.status().as_u16(), retry_after))
            }
            Err(_) => Err(OpenError::Transport),
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, attempt)
        .await
        .unwrap_or(Err(OpenError::Transport))
}

/// The `type` of a relay message; `None` for anything that is not v1 text.
fn message_type(message: &Message) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    let Message::Text(text) = message else {
        return None;
    };
    serde_json::from_str::<Typed>(text).ok().map(|t| t.kind)
}

/// One host's outcome.
#[derive(Default, Clone)]
struct Slot {
    registered_after: Option<Duration>,
    rehome_after: Option<Duration>,
    /// Wall clock of the re-home, and of the old tunnel's end.
    rehome_at_us: Option<u64>,
    old_end_at_us: Option<u64>,
}

#[derive(Default)]
struct Tally {
    retry_after: BTreeMap<u64, u64>,
    http_other: BTreeMap<u16, u64>,
    old_ends: BTreeMap<String, usize>,
}

/// State shared by a worker's host tasks.
struct Shared {
    config: WorkerConfig,
    window: Semaphore,
    setup_deadline: Instant,
    slots: Mutex<Vec<Slot>>,
    tally: Mutex<Tally>,
    registered: AtomicUsize,
    setup_failed: AtomicUsize,
    setup_failed_attempts: AtomicU64,
    first_connect_us: AtomicU64,
    last_registered_us: AtomicU64,
    drained: AtomicUsize,
    first_drain_us: AtomicU64,
    last_drain_us: AtomicU64,
    /// Hosts whose re-home ended (succeeded or gave up).
    rehome_done: AtomicUsize,
    last_rehome_us: AtomicU64,
    old_ended: AtomicUsize,
    last_old_end_us: AtomicU64,
    http_429: AtomicU64,
    transport_errors: AtomicU64,
}

impl Shared {
    fn new(config: WorkerConfig) -> Shared {
        let count = config.count;
        Shared {
            window: Semaphore::new(config.connect_window.max(1)),
            setup_deadline: Instant::now() + SETUP_DEADLINE,
            slots: Mutex::new(vec![Slot::default(); count]),
            tally: Mutex::new(Tally::default()),
            registered: AtomicUsize::new(0),
            setup_failed: AtomicUsize::new(0),
            setup_failed_attempts: AtomicU64::new(0),
            first_connect_us: AtomicU64::new(u64::MAX),
            last_registered_us: AtomicU64::new(0),
            drained: AtomicUsize::new(0),
            first_drain_us: AtomicU64::new(u64::MAX),
            last_drain_us: AtomicU64::new(0),
            rehome_done: AtomicUsize::new(0),
            last_rehome_us: AtomicU64::new(0),
            old_ended: AtomicUsize::new(0),
            last_old_end_us: AtomicU64::new(0),
            http_429: AtomicU64::new(0),
            transport_errors: AtomicU64::new(0),
            config,
        }
    }

    fn old_end(&self, local: usize, how: String) {
        self.slots.lock().expect("slots poisoned")[local].old_end_at_us = Some(now_us());
        *self
            .tally
            .lock()
            .expect("tally poisoned")
            .old_ends
            .entry(how)
            .or_default() += 1;
        self.last_old_end_us.fetch_max(now_us(), Ordering::Relaxed);
        self.old_ended.fetch_add(1, Ordering::Relaxed);
    }

    fn setup_report(&self) -> SetupReport {
        let slots = self.slots.lock().expect("slots poisoned");
        SetupReport {
            registered: self.registered.load(Ordering::Relaxed),
            failed: self.setup_failed.load(Ordering::Relaxed),
            first_connect_us: self.first_connect_us.load(Ordering::Relaxed),
            last_registered_us: self.last_registered_us.load(Ordering::Relaxed),
            latencies_us: slots
                .iter()
                .filter_map(|s| s.registered_after.map(micros))
                .collect(),
            failed_attempts: self.setup_failed_attempts.load(Ordering::Relaxed),
        }
    }

    fn drain_report(&self) -> DrainReport {
        let slots = self.slots.lock().expect("slots poisoned");
        let now = now_us();
        let gaps_us = slots
            .iter()
            .filter_map(|s| match (s.old_end_at_us, s.rehome_at_us) {
                (Some(end), Some(rehome)) if rehome > end => Some(rehome - end),
                (Some(end), None) => Some(now.saturating_sub(end)),
                _ => None,
            })
            .collect();
        let tally = self.tally.lock().expect("tally poisoned");
        DrainReport {
            drained: self.drained.load(Ordering::Relaxed),
            first_drain_us: self.first_drain_us.load(Ordering::Relaxed),
            last_drain_us: self.last_drain_us.load(Ordering::Relaxed),
            rehome_us: slots.iter().map(|s| s.rehome_after.map(micros)).collect(),
            last_rehome_us: self.last_rehome_us.load(Ordering::Relaxed),
            http_429: self.http_429.load(Ordering::Relaxed),
            retry_after: tally.retry_after.clone(),
            http_other: tally.http_other.clone(),
            transport_errors: self.transport_errors.load(Ordering::Relaxed),
            old_ends: tally.old_ends.clone(),
            last_old_end_us: self.last_old_end_us.load(Ordering::Relaxed),
            gaps_us,
        }
    }
}

/// The worker process: `config_json` is the value of [`WORKER_ENV`].
pub fn worker_main(config_json: &str) -> Result<()> {
    let config: WorkerConfig =
        serde_json::from_str(config_json).context("bad worker configuration")?;
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    let needed = config.count as u64 * 2 + 128;
    if soft < needed {
        bail!("worker: RLIMIT_NOFILE is {soft}, {needed} descriptors are needed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(worker(config))
}

fn emit(event: &WorkerEvent) -> Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(event)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn worker(config: WorkerConfig) -> Result<()> {
    // The bench closes stdin when it is done with us (or dies): exit at once, sockets and
    // all; nothing here needs an orderly goodbye.
    tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0_u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        std::process::exit(0);
    });

    let count = config.count;
    let role = config.role;
    let rehome_deadline = Duration::from_millis(config.rehome_deadline_ms);
    let shared = Arc::new(Shared::new(config));
    for local in 0..count {
        tokio::spawn(host(shared.clone(), local));
    }

    // Setup.
    let poll = Duration::from_millis(5);
    while shared.registered.load(Ordering::Relaxed) + shared.setup_failed.load(Ordering::Relaxed)
        < count
    {
        tokio::time::sleep(poll).await;
    }
    emit(&WorkerEvent::Ready(shared.setup_report()))?;
    if role == Role::Register {
        return std::future::pending().await;
    }

    // The drain: report when every host has re-homed (or given up) and every old tunnel
    // ended, or once the re-home deadline (plus slack) passed since the first `drain`.
    let drain_wait = Instant::now() + DRAIN_WAIT;
    while shared.drained.load(Ordering::Relaxed) == 0 && Instant::now() < drain_wait {
        tokio::time::sleep(poll).await;
    }
    let report_by = Instant::now() + rehome_deadline + REPORT_SLACK;
    let registered = shared.registered.load(Ordering::Relaxed);
    while Instant::now() < report_by
        && (shared.rehome_done.load(Ordering::Relaxed) < registered
            || shared.old_ended.load(Ordering::Relaxed) < registered)
    {
        tokio::time::sleep(poll).await;
    }
    emit(&WorkerEvent::Drained(shared.drain_report()))?;
    std::future::pending().await
}

/// One host, from its first registration to the end of the worker.
async fn host(shared: Arc<Shared>, local: usize) {
    let config = &shared.config;
    let index = config.first + local;
    let host_id = format!("h{index:05}");

    // 1. Register with the home relay.
    let (mut old, started) = loop {
        let (attempt, started) = {
            let _permit = shared.window.acquire().await.expect("never closed");
            let started = Instant::now();
            shared
                .first_connect_us
                .fetch_min(now_us(), Ordering::Relaxed);
            (open(config.home, &host_id, &config.token).await, started)
        };
        match attempt {
            Ok(socket) => break (socket, started),
            Err(_) if Instant::now() >= shared.setup_deadline => {
                shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                shared.setup_failed_attempts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    };
    match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, old.next()).await {
        Ok(Some(Ok(message))) => {
            if message_type(&message).as_deref() == Some("ping") {
                let _ = old.send(Message::text(PONG)).await;
            }
        }
        _ => {
            shared.setup_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    shared.slots.lock().expect("slots poisoned")[local].registered_after = Some(started.elapsed());
    shared
        .last_registered_us
        .fetch_max(now_us(), Ordering::Relaxed);
    shared.registered.fetch_add(1, Ordering::Relaxed);

    if config.role == Role::Register {
        serve_pings(old).await;
        return;
    }

    // 2. Idle until `drain`.
    loop {
        match old.next().await {
            Some(Ok(message)) => match message_type(&message).as_deref() {
                Some("ping") => {
                    let _ = old.send(Message::text(PONG)).await;
                }
                Some("drain") => break,
                _ => {}
            },
            Some(Err(_)) | None => {
                // Ended before any drain: counted, never re-homed.
                shared.old_end(local, "ended before drain".to_owned());
                shared.rehome_done.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    let drained_at = Instant::now();
    let stamp = now_us();
    shared.first_drain_us.fetch_min(stamp, Ordering::Relaxed);
    shared.last_drain_us.fetch_max(stamp, Ordering::Relaxed);
    shared.drained.fetch_add(1, Ordering::Relaxed);

    // 3. Make before break: the old tunnel keeps answering on its own task.
    let (replaced_tx, replaced_rx) = oneshot::channel();
    tokio::spawn(old_tunnel(shared.clone(), local, old, replaced_rx));

    let target = config.targets[index % config.targets.len()];
    let give_up = drained_at + REHOME_GIVE_UP;
    let mut new = loop {
        match open(target, &host_id, &config.token).await {
            Ok(socket) => break Some(socket),
            Err(OpenError::Status(429, retry_after)) => {
                shared.http_429.fetch_add(1, Ordering::Relaxed);
                let seconds = retry_after.unwrap_or(1);
                *shared
                    .tally
                    .lock()
                    .expect("tally poisoned")
                    .retry_after
                    .entry(seconds)
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_secs(seconds)).await;
            }
            Err(OpenError::Status(status, _)) => {
                *shared
                    .tally
                    .lock()
                    .expect("tally poisoned")
                    .http_other
                    .entry(status)
                    .or_default() += 1;
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(OpenError::Transport) => {
                shared.transport_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
        if Instant::now() >= give_up {
            break None;
        }
    };
    let first = match new.as_mut() {
        Some(socket) => tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, socket.next())
            .await
            .ok()
            .flatten()
            .and_then(Result::ok),
        None => None,
    };
    let Some(first) = first else {
        shared.rehome_done.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let took = drained_at.elapsed();
    {
        let mut slots = shared.slots.lock().expect("slots poisoned");
        slots[local].rehome_after = Some(took);
        slots[local].rehome_at_us = Some(now_us());
    }
    shared.last_rehome_us.fetch_max(now_us(), Ordering::Relaxed);
    shared.rehome_done.fetch_add(1, Ordering::Relaxed);
    let mut new = new.expect("a first message came from it");
    if message_type(&first).as_deref() == Some("ping") {
        let _ = new.send(Message::text(PONG)).await;
    }
    if let Some(after) = config.close_old_after_ms {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let _ = replaced_tx.send(());
        });
    }
    serve_pings(new).await;
}

/// Answers `ping`s until the socket ends.
async fn serve_pings(mut socket: Socket) {
    while let Some(Ok(message)) = socket.next().await {
        if message_type(&message).as_deref() == Some("ping") {
            let _ = socket.send(Message::text(PONG)).await;
        }
    }
}

/// A drained tunnel: answers `ping`s until the relay closes it, or closes it itself once
/// `replaced` fires.
async fn old_tunnel(
    shared: Arc<Shared>,
    local: usize,
    mut socket: Socket,
    mut replaced: oneshot::Receiver<()>,
) {
    let mut waiting_for_replacement = true;
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Close(frame))) => {
                    let how = match frame {
                        Some(frame) => u16::from(frame.code).to_string(),
                        None => "close without code".to_owned(),
                    };
                    // Reading on completes the close handshake (tungstenite answers it).
                    let _ = tokio::time::timeout(CLOSE_GRACE, async {
                        while let Some(Ok(_)) = socket.next().await {}
                    })
                    .await;
                    shared.old_end(local, how);
                    return;
                }
                Some(Ok(message)) => {
                    if message_type(&message).as_deref() == Some("ping") {
                        let _ = socket.send(Message::text(PONG)).await;
                    }
                }
                Some(Err(_)) => {
                    shared.old_end(local, "error".to_owned());
                    return;
                }
                None => {
                    shared.old_end(local, "eof".to_owned());
                    return;
                }
            },
            fired = &mut replaced, if waiting_for_replacement => {
                waiting_for_replacement = false;
                if fired.is_ok() {
                    let _ = socket
                        .close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "replaced".into(),
                        }))
                        .await;
                    let _ = tokio::time::timeout(CLOSE_GRACE, async {
                        while let Some(Ok(_)) = socket.next().await {}
                    })
                    .await;
                    shared.old_end(local, "closed by host after re-home".to_owned());
                    return;
                }
            }
        }
    }
}
