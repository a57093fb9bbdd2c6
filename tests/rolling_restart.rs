//! A rolling restart of a relay fleet under load, end to end: three relays in
//! proxy mode on one Redis directory, behind a test front door (a round-robin
//! TCP balancer, [`FrontDoor`]), twenty `relay agent` processes connected
//! through it, and clients hammering every host through it. Each relay in
//! turn gets SIGTERM, drains, exits 0 and starts again with the same machine
//! id on the same port, as a deploy would do it.
//!
//! The claim under test: a rolling restart fails no request. Every HTTP
//! request that gets no 2xx (or no response at all) is a failure, printed
//! with its host, the relay it landed on, its status and when. The test also
//! reports, without asserting them, the largest gap any host had between two
//! successful responses and how many client WebSocket channels had to be
//! reopened (a channel lives on one tunnel and one client connection; a
//! drain ends both, so some reconnects are expected).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use relay_tests::{
    Claims, DEADLINE, FrontDoor, RelayBuilder, TEST_SECRET, TestAgent, TestRedis, TestRelay,
    Upstream, wait_until, within,
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Relays in the fleet.
const RELAYS: usize = 3;

/// Hosts, each with its own `relay agent` process.
const HOSTS: usize = 20;

/// Pause between two HTTP requests of one host's client (20 hosts → ~400
/// requests a second in all, what two cores running three debug relays,
/// twenty agents and this client keep up with).
const HTTP_PACE: Duration = Duration::from_millis(50);

/// Pause between two messages on one host's WebSocket channel.
const WS_PACE: Duration = Duration::from_millis(100);

/// How long one HTTP request may take before it counts as failed: far above
/// a loopback round trip, far below the relay's 30 s exchange timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a WebSocket echo (or opening a channel) may take before the
/// channel counts as stalled and is reopened.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// Successful requests every host must have before the first restart, and
/// after each restart before the next one: proof that the load runs and the
/// fleet serves every host again.
const STEADY_SUCCESSES: usize = 5;

/// The hostId of host `i`.
fn host_id(i: usize) -> String {
    format!("host-{i:02}")
}

/// The machine id of relay `i` (kept across its restarts).
fn machine_id(i: usize) -> String {
    format!("relay-{i}")
}

/// Relay `i` on `port` (0: ephemeral), proxying over the shared directory.
/// Its own debug lines are on (one per request, with the path, and one for every
/// accepted connection, with the peer address), so a
/// failed request can be followed through every relay it touched, or shown
/// never to have been accepted.
fn relay_builder(redis: &TestRedis, i: usize, port: u16) -> RelayBuilder {
    TestRelay::builder()
        .machine_id(&machine_id(i))
        .redis(&redis.url())
        .routing("proxy")
        .rust_log("info,relay=debug")
        .port(port)
}

/// The wall-clock time of day in UTC, `HH:MM:SS.mmm`, to line failures up
/// with the relays' and agents' log timestamps.
fn wall_clock() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

/// The lines of a relay's log that tell how its drain went: the 6 steps, the
/// connections taken from the backlog when it stopped accepting, the hard
/// deadline's warnings and the last line.
fn is_drain_report_line(line: &str) -> bool {
    (line.contains("drain ") && line.contains("/6"))
        || line.contains("queued connections kept")
        || line.contains("deadline")
        || line.contains("stopped elapsed=")
}

/// One failed HTTP request.
struct Failure {
    host: String,
    seq: u64,
    /// The request path, as the relays log it.
    path: String,
    /// The relay the front door piped the request's connection to.
    hop: String,
    status: Option<u16>,
    detail: String,
    /// Since the load started.
    at: Duration,
    wall: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FAILED {} (+{:.3?}) {} #{} GET {} via {}: status {:?}: {}",
            self.wall, self.at, self.host, self.seq, self.path, self.hop, self.status, self.detail
        )
    }
}

/// Per-host record of the HTTP load.
#[derive(Default)]
struct HostStats {
    ok: usize,
    last_ok: Option<Instant>,
    max_gap: Duration,
    /// When (since the load started) the largest gap ended.
    max_gap_ended: Duration,
}

/// The client WebSocket channels' record.
#[derive(Default)]
struct WsStats {
    /// Channels opened (first opens and reopens).
    opened: usize,
    /// Channels that ended while the load ran and were reopened.
    reconnects: usize,
    reconnects_by_host: BTreeMap<String, usize>,
    /// How channels ended: `close 1001`, `dropped: ..`, `stalled`.
    endings: BTreeMap<String, usize>,
    /// Each ending: when, which host, through which relay, how, after how
    /// long.
    ending_log: Vec<String>,
    /// Opening attempts that failed, with the reason.
    open_failures: Vec<String>,
    /// Echoes received back as sent.
    echoes: usize,
    /// Echoes that came back different from what was sent.
    mismatches: Vec<String>,
}

/// Everything the load generators record. Std mutexes: each is held for a
/// few field updates, never across an await.
struct Load {
    started: Instant,
    relays: Vec<SocketAddr>,
    hosts: Vec<Mutex<HostStats>>,
    failures: Mutex<Vec<Failure>>,
    ws: Mutex<WsStats>,
}

// === impl Load ===

impl Load {
    fn new(relays: Vec<SocketAddr>) -> Self {
        Self {
            started: Instant::now(),
            relays,
            hosts: (0..HOSTS).map(|_| Mutex::default()).collect(),
            failures: Mutex::default(),
            ws: Mutex::default(),
        }
    }

    /// The name of the relay behind `backend`.
    fn relay_name(&self, backend: Option<SocketAddr>) -> String {
        match backend.and_then(|b| self.relays.iter().position(|r| *r == b)) {
            Some(i) => machine_id(i),
            None => "none (no relay accepted the connection)".to_owned(),
        }
    }

    fn success(&self, host: usize) {
        let now = Instant::now();
        let mut stats = self.hosts[host].lock().expect("host stats poisoned");
        if let Some(last) = stats.last_ok {
            let gap = now - last;
            if gap > stats.max_gap {
                stats.max_gap = gap;
                stats.max_gap_ended = now - self.started;
            }
        }
        stats.last_ok = Some(now);
        stats.ok += 1;
    }

    fn failure(&self, failure: Failure) {
        println!("{failure}");
        self.failures
            .lock()
            .expect("failures poisoned")
            .push(failure);
    }

    /// Successful requests per host so far.
    fn successes(&self) -> Vec<usize> {
        self.hosts
            .iter()
            .map(|h| h.lock().expect("host stats poisoned").ok)
            .collect()
    }

    fn ws(&self) -> std::sync::MutexGuard<'_, WsStats> {
        self.ws.lock().expect("ws stats poisoned")
    }
}

/// Aborts a spawned task when dropped (a request's connection driver).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One `GET path` on a new TCP connection through the front door. Returns
/// the client's local address (to ask the front door which relay it went to)
/// and the status and body, or what went wrong.
async fn get_once(
    front: &FrontDoor,
    path: &str,
    token: &str,
) -> (Option<SocketAddr>, Result<(u16, Bytes), String>) {
    let stream = match TcpStream::connect(front.addr()).await {
        Ok(stream) => stream,
        Err(err) => return (None, Err(format!("connect to the front door: {err}"))),
    };
    let local = stream.local_addr().ok();
    let authority = front.addr().to_string();
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| format!("HTTP handshake: {err:?}"))?;
        let _driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let request = Request::get(path)
            .header(http::header::HOST, &authority)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("request: {err:?}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("status {status}, then reading the body: {err:?}"))?
            .to_bytes();
        Ok((status, body))
    };
    let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no complete response within {REQUEST_TIMEOUT:?}")));
    (local, result)
}

/// Continuous GETs for host `index` until `stop`, each on a NEW connection.
///
/// A client that reuses a keep-alive connection can send a request just as
/// the server closes that idle connection (the server cannot know a request
/// is on its way); HTTP says such a request may be retried, and clients do.
/// That race is a property of HTTP/1.1 keep-alive, not of the relay, and it
/// would be counted here as a failure without saying anything about the
/// drain. With one connection per request, every failure is the relay's (or
/// the front door's, which only picks a relay that accepts the TCP connect).
async fn http_load(
    load: Arc<Load>,
    front: Arc<FrontDoor>,
    index: usize,
    token: String,
    stop: watch::Receiver<bool>,
) {
    let host = host_id(index);
    let mut pace = tokio::time::interval(HTTP_PACE);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0_u64;
    while !*stop.borrow() {
        pace.tick().await;
        seq += 1;
        let expected_path = format!("/echo/{host}/{seq}");
        let path = format!("/hosts/{host}{expected_path}");
        let (local, result) = get_once(&front, &path, &token).await;
        let hop = load.relay_name(local.and_then(|l| front.backend_of(l)));
        let at = load.started.elapsed();
        let wall = wall_clock();
        let failed = async |status: Option<u16>, detail: String| {
            // The front door's account of the connection, once its piping
            // ended (right after the client's side, or never if the client
            // gave up first).
            let mut end = None;
            if let Some(local) = local {
                let deadline = Instant::now() + Duration::from_secs(1);
                while end.is_none() && Instant::now() < deadline {
                    end = front.connection_end(local);
                    tokio::time::sleep(relay_tests::wait::POLL_INTERVAL).await;
                }
            }
            Failure {
                host: host.clone(),
                seq,
                path: path.clone(),
                hop: hop.clone(),
                status,
                detail: format!(
                    "{detail} [front door: {}]",
                    end.as_deref()
                        .unwrap_or("connection still piped or never piped")
                ),
                at,
                wall: wall.clone(),
            }
        };
        match result {
            Ok((status, body)) if (200..300).contains(&status) => {
                let path = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|echo| echo["path"].as_str().map(str::to_owned));
                if path.as_deref() == Some(expected_path.as_str()) {
                    load.success(index);
                } else {
                    let detail = format!(
                        "not this request's echo: {:?}",
                        String::from_utf8_lossy(&body)
                    );
                    load.failure(failed(Some(status), detail).await);
                }
            }
            Ok((status, body)) => {
                let body = String::from_utf8_lossy(&body);
                load.failure(failed(Some(status), format!("body {body:?}")).await);
            }
            Err(err) => load.failure(failed(None, err).await),
        }
    }
}

/// How one exchange on a channel went.
enum Echo {
    Same,
    Other(String),
    Ended(String),
}

/// Sends `text` and waits for the next data frame.
async fn echo_once<S>(ws: &mut S, text: &str) -> Echo
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin,
{
    if let Err(err) = ws.send(Message::text(text)).await {
        return Echo::Ended(format!("send failed: {err}"));
    }
    let next = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(got))) if got.as_str() == text => return Echo::Same,
                Some(Ok(Message::Text(got))) => return Echo::Other(got.as_str().to_owned()),
                Some(Ok(Message::Binary(got))) => return Echo::Other(format!("binary {got:?}")),
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return Echo::Ended(format!("close {code}"));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Echo::Ended(format!("dropped: {err}")),
                None => return Echo::Ended("dropped: end of stream".to_owned()),
            }
        }
    };
    match tokio::time::timeout(ECHO_TIMEOUT, next).await {
        Ok(echo) => echo,
        Err(_) => Echo::Ended("stalled".to_owned()),
    }
}

/// One open WebSocket echo channel for host `index` through the front door,
/// reopened whenever it ends, until `stop`.
async fn ws_load(
    load: Arc<Load>,
    front: Arc<FrontDoor>,
    index: usize,
    token: String,
    stop: watch::Receiver<bool>,
) {
    let host = host_id(index);
    let url = front.ws_url(&format!("/hosts/{host}/ws/echo"));
    let mut pace = tokio::time::interval(WS_PACE);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0_u64;
    let mut opened_before = false;
    while !*stop.borrow() {
        pace.tick().await;
        let mut request = url
            .as_str()
            .into_client_request()
            .expect("a valid WebSocket url");
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("a valid header value"),
        );
        // Our own TCP connection, to learn which relay the front door
        // picked for it.
        let connect = async {
            let stream = TcpStream::connect(front.addr())
                .await
                .map_err(|err| format!("connect to the front door: {err}"))?;
            let local = stream.local_addr().ok();
            let (ws, _) = tokio_tungstenite::client_async(request, stream)
                .await
                .map_err(|err| format!("upgrade: {err}"))?;
            Ok::<_, String>((ws, local))
        };
        let (mut ws, local) = match tokio::time::timeout(ECHO_TIMEOUT, connect).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) => {
                load.ws()
                    .open_failures
                    .push(format!("{} {host}: {err}", wall_clock()));
                continue;
            }
            Err(_) => {
                load.ws().open_failures.push(format!(
                    "{} {host}: no upgrade within {ECHO_TIMEOUT:?}",
                    wall_clock()
                ));
                continue;
            }
        };
        let entry = load.relay_name(local.and_then(|l| front.backend_of(l)));
        let opened_at = Instant::now();
        {
            let mut ws_stats = load.ws();
            ws_stats.opened += 1;
            if opened_before {
                ws_stats.reconnects += 1;
                *ws_stats.reconnects_by_host.entry(host.clone()).or_default() += 1;
            }
        }
        opened_before = true;
        let ending = loop {
            if *stop.borrow() {
                let _ = ws.close(None).await;
                return;
            }
            pace.tick().await;
            n += 1;
            let text = format!("{host}:{n}");
            match echo_once(&mut ws, &text).await {
                Echo::Same => load.ws().echoes += 1,
                Echo::Other(got) => load
                    .ws()
                    .mismatches
                    .push(format!("{host}: sent {text:?}, got {got:?}")),
                Echo::Ended(why) => break why,
            }
        };
        if *stop.borrow() {
            return;
        }
        let mut ws_stats = load.ws();
        ws_stats.ending_log.push(format!(
            "{} {host} via {entry}: {ending} after {:.3?}",
            wall_clock(),
            opened_at.elapsed()
        ));
        *ws_stats.endings.entry(ending).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_relays_behind_a_front_door_fails_no_request_with_h2_agents() {
    rolling_restart_fails_no_request("h2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_relays_behind_a_front_door_fails_no_request_with_v1_agents() {
    rolling_restart_fails_no_request("v1").await;
}

/// The rolling restart, with every agent speaking `protocol`.
async fn rolling_restart_fails_no_request(protocol: &str) {
    let redis = TestRedis::spawn().await;
    let mut relays = Vec::new();
    for i in 0..RELAYS {
        relays.push(relay_builder(&redis, i, 0).spawn().await);
    }
    for relay in &relays {
        redis.wait_advertised(relay).await;
    }
    let addrs: Vec<SocketAddr> = relays.iter().map(TestRelay::addr).collect();
    let front = Arc::new(FrontDoor::spawn(&addrs).await);
    let upstream = Upstream::spawn().await;
    let mut agents: Vec<TestAgent> = (0..HOSTS)
        .map(|i| {
            TestAgent::builder(&host_id(i))
                .relay(&front.ws_url(""))
                .token(&Claims::host(&host_id(i)).sign(TEST_SECRET))
                .upstream(&upstream)
                .backoff_base("200ms")
                .backoff_cap("1s")
                .drain_spread("100ms")
                .protocol(protocol)
                .spawn()
        })
        .collect();
    for agent in &agents {
        agent.wait_registered(1).await;
    }
    let token = Claims::client(&["*"]).sign(TEST_SECRET);
    for i in 0..HOSTS {
        let path = format!("/hosts/{}/echo/warm-up", host_id(i));
        relay_tests::wait_until_async(
            &format!("{} answers through the front door", host_id(i)),
            DEADLINE,
            || async { matches!(get_once(&front, &path, &token).await.1, Ok((200, _))) },
        )
        .await;
    }
    let placement: Vec<usize> = relays
        .iter()
        .map(|relay| {
            relay
                .logs()
                .iter()
                .filter(|line| line.contains("tunnel registered"))
                .count()
        })
        .collect();
    println!("tunnels per relay before the restarts: {placement:?}");

    let load = Arc::new(Load::new(addrs.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..HOSTS {
        tasks.push(tokio::spawn(http_load(
            load.clone(),
            front.clone(),
            i,
            token.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(ws_load(
            load.clone(),
            front.clone(),
            i,
            token.clone(),
            stop_rx.clone(),
        )));
    }
    let every_host_served_since = |before: &[usize]| {
        let now = load.successes();
        now.iter()
            .zip(before)
            .all(|(now, before)| *now >= before + STEADY_SUCCESSES)
    };
    let none = vec![0; HOSTS];
    wait_until("every host is served under load", DEADLINE, || {
        every_host_served_since(&none)
    })
    .await;

    let mut drain_reports = Vec::new();
    let mut old_logs = Vec::new();
    for i in 0..RELAYS {
        let before = load.successes();
        let port = addrs[i].port();
        println!(
            "{} (+{:.3?}) SIGTERM to {}",
            wall_clock(),
            load.started.elapsed(),
            machine_id(i)
        );
        let signalled_at = Instant::now();
        relays[i].send_sigterm();
        let status = relays[i].wait_exit(DEADLINE).await;
        let drained_in = signalled_at.elapsed();
        let logs = relays[i].logs();
        assert_eq!(
            status.code(),
            Some(0),
            "{} exits 0 after its drain, got {status}",
            machine_id(i)
        );
        drain_reports.push(format!(
            "{}: exit 0 after {drained_in:.3?}\n    {}",
            machine_id(i),
            logs.iter()
                .filter(|line| is_drain_report_line(line))
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join("\n    ")
        ));
        old_logs.push((format!("{} (run 1)", machine_id(i)), logs));
        relays[i] = relay_builder(&redis, i, port).spawn().await;
        redis.wait_advertised(&relays[i]).await;
        println!(
            "{} (+{:.3?}) {} back on port {port}",
            wall_clock(),
            load.started.elapsed(),
            machine_id(i)
        );
        wait_until(
            &format!(
                "every host is served again after restarting {}",
                machine_id(i)
            ),
            DEADLINE,
            || every_host_served_since(&before),
        )
        .await;
    }

    stop_tx.send(true).expect("load tasks listen");
    let total = load.started.elapsed();
    for task in tasks {
        within("a load task to stop", REQUEST_TIMEOUT + ECHO_TIMEOUT, task)
            .await
            .expect("load task");
    }

    // === report ===
    let successes: usize = load.successes().iter().sum();
    let failures = std::mem::take(&mut *load.failures.lock().expect("failures poisoned"));
    let (gap_host, gap, gap_at) = (0..HOSTS)
        .map(|i| {
            let stats = load.hosts[i].lock().expect("host stats poisoned");
            (host_id(i), stats.max_gap, stats.max_gap_ended)
        })
        .max_by_key(|(_, gap, _)| *gap)
        .expect("there are hosts");
    let ws = load.ws();
    println!("==== rolling restart of {RELAYS} relays, {HOSTS} hosts, {total:.3?} of load ====");
    for report in &drain_reports {
        println!("{report}");
    }
    println!(
        "HTTP: {successes} ok, {} failed; largest gap between two successes of one host: \
         {gap:.3?} ({gap_host}, ended at +{gap_at:.3?})",
        failures.len()
    );
    println!(
        "WebSocket: {} channels opened, {} reconnects ({} hosts), {} echoes, endings {:?}, \
         {} open failures, {} mismatched echoes",
        ws.opened,
        ws.reconnects,
        ws.reconnects_by_host.len(),
        ws.echoes,
        ws.endings,
        ws.open_failures.len(),
        ws.mismatches.len()
    );
    for failure in &ws.open_failures {
        println!("  WS open failure: {failure}");
    }
    for ending in &ws.ending_log {
        println!("  WS channel ended: {ending}");
    }
    println!(
        "front door: {} connections routed, {} backend connects refused, {} unrouted",
        front.routed(),
        front.refused(),
        front.unrouted()
    );
    let registrations: usize = agents.iter().map(TestAgent::registered_count).sum();
    println!("agent tunnel registrations: {registrations}");
    for agent in &mut agents {
        assert!(
            agent.try_exit_status().is_none(),
            "agent {} exited during the rolling restart",
            agent.host_id()
        );
    }
    if !failures.is_empty() {
        let runs: Vec<(String, Vec<String>)> = old_logs
            .iter()
            .cloned()
            .chain(
                relays
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("{} (run 2)", machine_id(i)), r.logs())),
            )
            .collect();
        for failure in &failures {
            println!("{failure}");
            // The relays' debug lines name the request path in their span
            // (`uri=/hosts/..}`): every relay the request went through.
            // And the relay's `connection .. accepted` line names the front
            // door's end of the connection, if the relay accepted it.
            let needle = format!("{}}}", failure.path);
            let from = failure
                .detail
                .split("piped from ")
                .nth(1)
                .and_then(|rest| rest.split(';').next())
                .map(|addr| format!("connection {addr} accepted"));
            for (name, logs) in &runs {
                for line in logs.iter().filter(|line| {
                    line.contains(&needle)
                        || from
                            .as_ref()
                            .is_some_and(|from| line.contains(from.as_str()))
                }) {
                    println!("    {name}: {line}");
                }
            }
        }
        for (name, logs) in &runs {
            println!("---- {name}: WARN/ERROR lines ----");
            for line in logs
                .iter()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
            {
                println!("{line}");
            }
        }
        let failed_hosts: std::collections::BTreeSet<&str> =
            failures.iter().map(|f| f.host.as_str()).collect();
        for agent in agents.iter().filter(|a| failed_hosts.contains(a.host_id())) {
            println!("---- agent {} ----", agent.host_id());
            for line in agent.logs() {
                println!("{line}");
            }
        }
    }
    assert!(
        ws.mismatches.is_empty(),
        "WebSocket echoes came back different: {:?}",
        ws.mismatches
    );
    assert!(
        failures.is_empty(),
        "{} of {} HTTP requests failed during the rolling restart (listed above)",
        failures.len(),
        successes + failures.len()
    );
}
