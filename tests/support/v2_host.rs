//! Tunnel v2 ("dial-back") host agents for tests, mirroring superset's
//! `tunnel-client-v2.ts` on the wire (`tunnel-v2-protocol.ts`).
//!
//! The contract, as that client speaks it:
//! - Control: one WebSocket `ws://<relay>/v2/control?hostId=<id>&token=<jwt>`
//!   (form-encoded, so `:` goes as `%3A`). The host sends `{"type":"ping"}`
//!   every 30 s and the relay answers `{"type":"pong"}`. The relay sends
//!   `{"type":"stream:dial","ticket","kind":"ws"|"http","path","query"?}`.
//!   When the control closes (4400 bad request, 4401 auth expired, 4403
//!   forbidden, 4408 stale host, 4409 replaced, 4410 tunnel gone, 4001
//!   drain, ...) the client reconnects after a delay, re-reading its relay
//!   URL and token.
//! - ws dial: the host opens `ws://<that relay>/v2/dial?hostId=<id>&ticket=<t>`
//!   and the local `ws://<upstream><path>?token=<secret>&<query minus token>`
//!   at once and pipes frames verbatim both ways (text stays text). Frames
//!   for a side still connecting are buffered, at most 256, else both close
//!   1011 "Peer too slow to connect". A close with code `c` on one side
//!   closes the other with `c` if `c == 1000` or `3000..=4999`, else 1011,
//!   reason "Peer closed".
//! - http dial: the relay sends text `{"type":"http:request","method","path",
//!   "headers"}`, binary body chunks and text `{"type":"http:end"}`; the host
//!   calls `http://<upstream><path>` with `Authorization: Bearer <secret>` and
//!   answers `{"type":"http:response","status","headers"}` (minus
//!   content-encoding/-length, transfer-encoding), the body in binary frames
//!   of at most 256 KiB and `{"type":"http:end"}`; a failed upstream call is
//!   a 502 with `{}` headers. The relay then closes the dial with 1000.
//!
//! [`V2Host`] is that client in background tasks, with observers and knobs;
//! [`V2Control`] and [`dial_raw`] let a test play the host by hand. Not
//! mirrored: the 75 s inbound-silence reconnect and the dial retry with
//! `stream:dial-failed` of newer clients. Where a browser would abort a dial
//! side still connecting when its peer ends, this one closes it as soon as it
//! opens, so the relay always sees a Close frame (1011 for a refused upstream).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::client::HttpClient;
use crate::host::msg_type;
use crate::ws::{WsClient, WsEnd, WsStream, rejection_status};
use crate::{DEADLINE, wait_until};

/// Frames held for a dial side that is still connecting.
const MAX_BUFFERED_FRAMES: usize = 256;
/// Largest binary frame of an http dial's response body.
const BODY_CHUNK_BYTES: usize = 256 * 1024;
/// Response headers the client drops (fetch already decoded the body).
const STRIPPED_RESPONSE_HEADERS: &[&str] =
    &["content-encoding", "content-length", "transfer-encoding"];
/// Request headers not copied to the upstream: hyper frames the body itself,
/// and the host's own bearer replaces any `authorization`.
const NOT_FORWARDED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "authorization",
];
const PING: &str = r#"{"type":"ping"}"#;
const HTTP_END: &str = r#"{"type":"http:end"}"#;

/// `ws://<relay origin>/v2/control?hostId=..&token=..` for a base such as
/// `http://127.0.0.1:PORT`.
pub fn control_url(relay_base: &str, host_id: &str, token: &str) -> String {
    let (host_id, token) = (form_encode(host_id), form_encode(token));
    format!(
        "{}/v2/control?hostId={host_id}&token={token}",
        ws_origin(relay_base)
    )
}

/// `ws://<relay origin>/v2/dial?hostId=..&ticket=..`.
pub fn dial_url(relay_base: &str, host_id: &str, ticket: &str) -> String {
    let (host_id, ticket) = (form_encode(host_id), form_encode(ticket));
    format!(
        "{}/v2/dial?hostId={host_id}&ticket={ticket}",
        ws_origin(relay_base)
    )
}

/// Dials back for `ticket` by hand (for used, unknown or foreign tickets);
/// read the relay's close code with [`WsClient::recv_close_code`].
///
/// # Errors
///
/// The handshake's error, if the relay refused the upgrade.
pub async fn dial_raw(
    relay_base: &str,
    host_id: &str,
    ticket: &str,
) -> Result<WsClient, tungstenite::Error> {
    WsClient::connect(&dial_url(relay_base, host_id, ticket), None).await
}

/// A v2 control channel driven by the test: watch `stream:dial`s, answer
/// (or not) with [`dial_raw`].
pub struct V2Control {
    ws: WsClient,
}

// === impl V2Control ===

impl V2Control {
    /// Opens `/v2/control` for `host_id` with `token`.
    ///
    /// # Errors
    ///
    /// The handshake's error, if the relay refused the upgrade.
    pub async fn connect(
        relay_base: &str,
        host_id: &str,
        token: &str,
    ) -> Result<Self, tungstenite::Error> {
        let ws = WsClient::connect(&control_url(relay_base, host_id, token), None).await?;
        Ok(Self { ws })
    }

    /// Sends `{"type":"ping"}`.
    pub async fn ping(&mut self) {
        self.ws.send_text(PING).await;
    }

    /// The next control message, pongs included, or how the control ended.
    ///
    /// # Panics
    ///
    /// On a non-JSON or binary frame, or if nothing arrives within `timeout`.
    pub async fn recv_json(&mut self, timeout: Duration) -> Result<Value, WsEnd> {
        match self.ws.recv(timeout).await? {
            Message::Text(text) => Ok(serde_json::from_str(text.as_str())
                .unwrap_or_else(|err| panic!("relay sent non-JSON {text:?} on control: {err}"))),
            other => panic!("relay sent a non-text frame on the control: {other:?}"),
        }
    }

    /// The next `stream:dial`, skipping pongs.
    ///
    /// # Panics
    ///
    /// On any other message, if the control ends or nothing comes in `timeout`.
    pub async fn expect_dial(&mut self, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_json(left).await {
                Ok(msg) if msg_type(&msg) == "pong" => {}
                Ok(msg) if msg_type(&msg) == "stream:dial" => return msg,
                Ok(msg) => panic!("expected a stream:dial on the control, got {msg}"),
                Err(end) => panic!("expected a stream:dial, but the control ended: {end:?}"),
            }
        }
    }

    /// The underlying WebSocket (close codes, raw frames).
    pub fn ws_mut(&mut self) -> &mut WsClient {
        &mut self.ws
    }
}

/// Builder for [`V2Host`]; see [`V2Host::builder`].
#[must_use = "a builder does nothing until `spawn`"]
pub struct V2HostBuilder {
    host_id: String,
    token: String,
    upstream: SocketAddr,
    relays: Vec<String>,
    ping_interval: Duration,
    reconnect_delay: Duration,
    secret: String,
}

impl V2HostBuilder {
    /// Adds one relay base URL (`http://127.0.0.1:PORT`).
    pub fn relay(mut self, base: &str) -> Self {
        self.relays.push(base.to_owned());
        self
    }

    /// Relay base URLs, tried in turn: each (re)connect uses the next one.
    pub fn relays(mut self, bases: Vec<String>) -> Self {
        self.relays = bases;
        self
    }

    /// Period of `{"type":"ping"}` (default 30 s, as the client).
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// Wait before reconnecting a closed control (default 200 ms; the
    /// client's partysocket waits 1-5 s).
    pub fn reconnect_delay(mut self, delay: Duration) -> Self {
        self.reconnect_delay = delay;
        self
    }

    /// The host-service secret sent to the upstream (default `v2-host-secret`).
    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = secret.to_owned();
        self
    }

    /// Starts connecting in the background.
    ///
    /// # Panics
    ///
    /// Without any relay.
    pub fn spawn(self) -> V2Host {
        assert!(!self.relays.is_empty(), "V2Host needs at least one relay");
        let (ctl, _) = watch::channel(Ctl {
            stopped: false,
            reconnecting: true,
            kicks: 0,
        });
        let shared = Arc::new(Shared {
            host_id: self.host_id,
            upstream: self.upstream,
            secret: self.secret,
            relays: self.relays,
            ping_interval: self.ping_interval,
            reconnect_delay: self.reconnect_delay,
            token: Mutex::new(self.token),
            pinging: AtomicBool::new(true),
            dialing: AtomicBool::new(true),
            ctl,
            connects: AtomicUsize::new(0),
            pongs: AtomicUsize::new(0),
            log: Mutex::default(),
        });
        let task = tokio::spawn(shared.clone().run());
        V2Host { shared, task }
    }
}

/// Knobs the background task watches.
#[derive(Clone)]
struct Ctl {
    stopped: bool,
    reconnecting: bool,
    /// Bumped by [`V2Host::reconnect`].
    kicks: u64,
}

/// What the host has seen. A std mutex, never held across an await.
#[derive(Default)]
struct Log {
    connected_to: Option<String>,
    refusals: Vec<Option<u16>>,
    control_closes: Vec<(u16, String)>,
    dial_close_codes: Vec<u16>,
    /// Every control message but pongs.
    messages: Vec<Value>,
}

struct Shared {
    host_id: String,
    upstream: SocketAddr,
    secret: String,
    relays: Vec<String>,
    ping_interval: Duration,
    reconnect_delay: Duration,
    token: Mutex<String>,
    pinging: AtomicBool,
    dialing: AtomicBool,
    ctl: watch::Sender<Ctl>,
    connects: AtomicUsize,
    pongs: AtomicUsize,
    log: Mutex<Log>,
}

/// A well-behaved v2 host running in background tasks (all aborted on drop).
pub struct V2Host {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

// === impl V2Host ===

impl V2Host {
    /// A host `host_id` authenticating with `token` and serving `upstream`.
    pub fn builder(host_id: &str, token: &str, upstream: SocketAddr) -> V2HostBuilder {
        V2HostBuilder {
            host_id: host_id.to_owned(),
            token: token.to_owned(),
            upstream,
            relays: Vec::new(),
            ping_interval: Duration::from_secs(30),
            reconnect_delay: Duration::from_millis(200),
            secret: "v2-host-secret".to_owned(),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.shared.log.lock().expect("v2 host log poisoned")
    }

    /// Whether a control is open.
    pub fn is_connected(&self) -> bool {
        self.log().connected_to.is_some()
    }

    /// The relay base URL the open control is on.
    pub fn connected_to(&self) -> Option<String> {
        self.log().connected_to.clone()
    }

    /// Waits until a control is open (the relay may register it a moment later).
    pub async fn wait_connected(&self, timeout: Duration) {
        let what = format!("v2 host {} has its control open", self.shared.host_id);
        wait_until(&what, timeout, || self.is_connected()).await;
    }

    /// Waits until the open control is on `relay_base`.
    pub async fn wait_connected_to(&self, relay_base: &str, timeout: Duration) {
        let what = format!(
            "v2 host {} is connected to {relay_base}",
            self.shared.host_id
        );
        wait_until(&what, timeout, || {
            self.connected_to().as_deref() == Some(relay_base)
        })
        .await;
    }

    /// Controls opened so far.
    pub fn connects(&self) -> usize {
        self.shared.connects.load(Ordering::SeqCst)
    }

    /// Every failed control open: the HTTP status the relay refused the
    /// upgrade with, `None` for a connection error or timeout.
    pub fn refusals(&self) -> Vec<Option<u16>> {
        self.log().refusals.clone()
    }

    /// Pongs received so far.
    pub fn pongs(&self) -> usize {
        self.shared.pongs.load(Ordering::SeqCst)
    }

    /// Every control close seen: the relay's code and reason, `1005` for a
    /// Close without code, `1006` (and the error) for a drop without Close.
    pub fn control_closes(&self) -> Vec<(u16, String)> {
        self.log().control_closes.clone()
    }

    /// Every control message received but pongs.
    pub fn control_messages(&self) -> Vec<Value> {
        self.log().messages.clone()
    }

    /// `stream:dial`s of `kind` (`"ws"`, `"http"`) received, dialed or not.
    pub fn dials(&self, kind: &str) -> usize {
        let log = self.log();
        let is_dial = |m: &&Value| msg_type(m) == "stream:dial" && m["kind"] == kind;
        log.messages.iter().filter(is_dial).count()
    }

    /// The latest `stream:dial`.
    pub fn last_dial(&self) -> Option<Value> {
        let log = self.log();
        log.messages
            .iter()
            .rev()
            .find(|m| msg_type(m) == "stream:dial")
            .cloned()
    }

    /// The latest `stream:dial`'s ticket.
    pub fn last_ticket(&self) -> Option<String> {
        self.last_dial()
            .and_then(|dial| dial["ticket"].as_str().map(str::to_owned))
    }

    /// Close codes the relay sent on dial sockets (ws and http).
    pub fn dial_close_codes(&self) -> Vec<u16> {
        self.log().dial_close_codes.clone()
    }

    /// Whether pings are sent (off: let the relay find the host stale).
    pub fn set_pinging(&self, on: bool) {
        self.shared.pinging.store(on, Ordering::SeqCst);
    }

    /// Whether `stream:dial`s are dialed back (off: only recorded).
    pub fn set_dialing(&self, on: bool) {
        self.shared.dialing.store(on, Ordering::SeqCst);
    }

    /// Whether a closed control is reopened (off: stays down until on again).
    pub fn set_reconnecting(&self, on: bool) {
        self.shared.ctl.send_modify(|ctl| ctl.reconnecting = on);
    }

    /// The token used from the next (re)connect on.
    pub fn set_token(&self, token: &str) {
        *self.shared.token.lock().expect("v2 host token poisoned") = token.to_owned();
    }

    /// Closes the open control with 1000 and reconnects (to the next relay).
    pub fn reconnect(&self) {
        self.shared.ctl.send_modify(|ctl| ctl.kicks += 1);
    }

    /// Closes the control with 1000 "Shutting down" and stops reconnecting.
    pub fn stop(&self) {
        self.shared.ctl.send_modify(|ctl| ctl.stopped = true);
    }
}

impl Drop for V2Host {
    fn drop(&mut self) {
        // Its JoinSet of dial tasks goes with it.
        self.task.abort();
    }
}

// === impl Shared ===

impl Shared {
    /// Connects, serves the control until it closes, waits, connects to the next relay.
    async fn run(self: Arc<Self>) {
        let mut dials = JoinSet::new();
        let mut ctl = self.ctl.subscribe();
        for attempt in 0.. {
            if ctl.borrow().stopped {
                return;
            }
            let relay = &self.relays[attempt % self.relays.len()];
            let token = self.token.lock().expect("v2 host token poisoned").clone();
            let url = control_url(relay, &self.host_id, &token);
            let connect = tokio_tungstenite::connect_async(url);
            match tokio::time::timeout(DEADLINE, connect).await {
                Ok(Ok((ws, _))) => {
                    self.connects.fetch_add(1, Ordering::SeqCst);
                    self.log.lock().expect("v2 host log poisoned").connected_to =
                        Some(relay.clone());
                    self.control(ws, relay, &mut dials).await;
                }
                failed => {
                    let status = failed
                        .ok()
                        .and_then(|r| r.err())
                        .and_then(|e| rejection_status(&e));
                    self.log
                        .lock()
                        .expect("v2 host log poisoned")
                        .refusals
                        .push(status);
                }
            }
            // Down while reconnecting is off; then partysocket's delay.
            let _ = ctl.wait_for(|c| c.stopped || c.reconnecting).await;
            let stop = async {
                let _ = ctl.wait_for(|c| c.stopped).await;
            };
            tokio::select! {
                () = tokio::time::sleep(self.reconnect_delay) => {}
                () = stop => return,
            }
        }
    }

    /// One control connection, until the relay closes it or the test stops it.
    async fn control(self: &Arc<Self>, mut ws: WsStream, relay: &str, dials: &mut JoinSet<()>) {
        let mut ctl = self.ctl.subscribe();
        let kicks = ctl.borrow().kicks;
        let start = tokio::time::Instant::now() + self.ping_interval;
        let mut ping = tokio::time::interval_at(start, self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            while dials.try_join_next().is_some() {}
            tokio::select! {
                _ = ping.tick() => {
                    if self.pinging.load(Ordering::SeqCst) {
                        let _ = ws.send(Message::text(PING)).await;
                    }
                }
                stopped = stopped_or_kicked(&mut ctl, kicks) => {
                    let reason = if stopped { "Shutting down" } else { "Reconnecting" };
                    let frame = CloseFrame { code: 1000.into(), reason: reason.into() };
                    let _ = ws.send(Message::Close(Some(frame))).await;
                    break None;
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => self.on_control(text.as_str(), relay, dials),
                    Some(Ok(Message::Close(frame))) => break Some(frame.map_or_else(
                        || (1005, String::new()),
                        |f| (u16::from(f.code), f.reason.as_str().to_owned()),
                    )),
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break Some((1006, err.to_string())),
                    None => break Some((1006, "end of stream".to_owned())),
                },
            }
        };
        {
            let mut log = self.log.lock().expect("v2 host log poisoned");
            log.connected_to = None;
            log.control_closes.extend(end);
        }
        // Finish the close handshake aside: the reconnect does not wait on it.
        dials.spawn(async move { drain(&mut ws).await });
    }

    fn on_control(self: &Arc<Self>, text: &str, relay: &str, dials: &mut JoinSet<()>) {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if msg_type(&msg) == "pong" {
            self.pongs.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.log
            .lock()
            .expect("v2 host log poisoned")
            .messages
            .push(msg.clone());
        if msg_type(&msg) != "stream:dial" || !self.dialing.load(Ordering::SeqCst) {
            return;
        }
        let ticket = msg["ticket"].as_str().unwrap_or_default();
        let dial = dial_url(relay, &self.host_id, ticket);
        if msg["kind"] == "http" {
            dials.spawn(self.clone().http_dial(dial));
        } else {
            let path = msg["path"].as_str().unwrap_or("/");
            let local = local_ws_url(self.upstream, path, msg["query"].as_str(), &self.secret);
            dials.spawn(self.clone().ws_dial(dial, local));
        }
    }

    fn dial_closed(&self, code: u16) {
        self.log
            .lock()
            .expect("v2 host log poisoned")
            .dial_close_codes
            .push(code);
    }

    /// A ws dial: the relay's dial socket (0) and the local socket (1), piped.
    async fn ws_dial(self: Arc<Self>, dial: String, local: String) {
        let mut ends = [End::Connecting(open(dial)), End::Connecting(open(local))];
        let mut pending: [Vec<Message>; 2] = Default::default();
        loop {
            let (i, event) = {
                let [relay, local] = &mut ends;
                tokio::select! {
                    event = next_event(relay) => (0, event),
                    event = next_event(local) => (1, event),
                }
            };
            let other = 1 - i;
            match event {
                Event::Opened(mut ws) => {
                    for frame in pending[i].drain(..) {
                        let _ = ws.send(frame).await;
                    }
                    ends[i] = End::Open(ws);
                }
                Event::Frame(frame) => match &mut ends[other] {
                    End::Open(ws) => {
                        let _ = ws.send(frame).await;
                    }
                    End::Connecting(_) if pending[other].len() >= MAX_BUFFERED_FRAMES => {
                        let reason = "Peer too slow to connect";
                        close_end(&mut ends[i], 1011, reason).await;
                        close_end(&mut ends[other], 1011, reason).await;
                        break;
                    }
                    End::Connecting(_) => pending[other].push(frame),
                    End::Gone => {}
                },
                Event::Closed(code) => {
                    if matches!(ends[i], End::Connecting(_)) {
                        ends[i] = End::Gone;
                    }
                    if let (0, Some(code)) = (i, code) {
                        self.dial_closed(code);
                    }
                    let code = match code.unwrap_or(1006) {
                        c @ (1000 | 3000..=4999) => c,
                        _ => 1011,
                    };
                    close_end(&mut ends[other], code, "Peer closed").await;
                    break;
                }
            }
        }
        // Complete both close handshakes.
        let [relay, local] = &mut ends;
        tokio::join!(drain_end(relay), drain_end(local));
    }

    /// An http dial: one exchange read from the dial socket, run against the upstream.
    async fn http_dial(self: Arc<Self>, dial: String) {
        let Some(mut ws) = open(dial).await else {
            return;
        };
        let (mut head, mut body) = (None, Vec::new());
        loop {
            match read(&mut ws).await {
                Event::Frame(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                    match msg_type(&frame) {
                        "http:request" => head = Some(frame),
                        "http:end" => break,
                        _ => {}
                    }
                }
                Event::Frame(Message::Binary(chunk)) => body.extend_from_slice(&chunk),
                Event::Frame(_) | Event::Opened(_) => {}
                Event::Closed(code) => {
                    code.into_iter().for_each(|code| self.dial_closed(code));
                    drain(&mut ws).await;
                    return;
                }
            }
        }
        let frames = match head {
            Some(head) => self.forward_http(&head, body).await,
            None => vec![Message::Close(Some(CloseFrame {
                code: 1011.into(),
                reason: "Missing request header".into(),
            }))],
        };
        for frame in frames {
            if ws.send(frame).await.is_err() {
                break;
            }
        }
        // The relay closes with 1000 after the end.
        let closed = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Event::Closed(code) = read(&mut ws).await {
                    return code;
                }
            }
        });
        if let Ok(Some(code)) = closed.await {
            self.dial_closed(code);
        }
        drain(&mut ws).await;
    }

    /// The upstream exchange for `head` and `body`, as the frames to answer with.
    async fn forward_http(&self, head: &Value, body: Vec<u8>) -> Vec<Message> {
        let method = head["method"].as_str().unwrap_or("GET");
        let path = head["path"].as_str().unwrap_or("/");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.upstream));
        if let Some(Value::Object(headers)) = head.get("headers") {
            for (name, value) in headers {
                let skip = NOT_FORWARDED.contains(&name.to_ascii_lowercase().as_str());
                if let (false, Some(value)) = (skip, value.as_str()) {
                    req = req.header(name.as_str(), value);
                }
            }
        }
        let req = req.header("authorization", format!("Bearer {}", self.secret));
        let sent = match req.body(Full::new(Bytes::from(body))) {
            Ok(req) => HttpClient::new().send(req, DEADLINE * 6).await,
            Err(err) => Err(err.to_string()),
        };
        let Ok(resp) = sent else {
            let head = json!({"type": "http:response", "status": 502, "headers": {}});
            return vec![Message::text(head.to_string()), Message::text(HTTP_END)];
        };
        let mut headers = Map::new();
        for (name, value) in &resp.headers {
            if STRIPPED_RESPONSE_HEADERS.contains(&name.as_str()) {
                continue;
            }
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            if let Some(Value::String(joined)) = headers.get_mut(name.as_str()) {
                *joined = format!("{joined}, {value}");
            } else {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
        let head =
            json!({"type": "http:response", "status": resp.status.as_u16(), "headers": headers});
        let mut frames = vec![Message::text(head.to_string())];
        let len = resp.body.len();
        frames.extend(
            (0..len)
                .step_by(BODY_CHUNK_BYTES)
                .map(|at| Message::binary(resp.body.slice(at..len.min(at + BODY_CHUNK_BYTES)))),
        );
        frames.push(Message::text(HTTP_END));
        frames
    }
}

/// Waits for [`V2Host::stop`] (`true`) or [`V2Host::reconnect`] (`false`).
async fn stopped_or_kicked(ctl: &mut watch::Receiver<Ctl>, kicks: u64) -> bool {
    ctl.wait_for(|c| c.stopped || c.kicks != kicks)
        .await
        .map_or(true, |c| c.stopped)
}

type Connecting = Pin<Box<dyn Future<Output = Option<Box<WsStream>>> + Send>>;

/// One side of a dial.
enum End {
    Connecting(Connecting),
    Open(Box<WsStream>),
    Gone,
}

/// What happened on one side.
enum Event {
    Opened(Box<WsStream>),
    Frame(Message),
    /// Closed, with the Close frame's code (`1005` without one), or `None` when
    /// it failed or dropped without Close (the 1006 a WHATWG client reports).
    Closed(Option<u16>),
}

/// Opens a WebSocket within [`DEADLINE`]; `None` if that fails.
fn open(url: String) -> Connecting {
    Box::pin(async move {
        let connect = tokio_tungstenite::connect_async(url);
        match tokio::time::timeout(DEADLINE, connect).await {
            Ok(Ok((ws, _))) => Some(Box::new(ws)),
            _ => None,
        }
    })
}

async fn next_event(end: &mut End) -> Event {
    match end {
        End::Connecting(connecting) => match connecting.await {
            Some(ws) => Event::Opened(ws),
            None => Event::Closed(None),
        },
        End::Open(ws) => read(ws).await,
        End::Gone => std::future::pending().await,
    }
}

/// The next data frame or close of `ws`.
async fn read(ws: &mut WsStream) -> Event {
    loop {
        match ws.next().await {
            Some(Ok(frame @ (Message::Text(_) | Message::Binary(_)))) => {
                return Event::Frame(frame);
            }
            Some(Ok(Message::Close(frame))) => {
                return Event::Closed(Some(frame.map_or(1005, |f| u16::from(f.code))));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Event::Closed(None),
        }
    }
}

/// Closes `end`; one still connecting is closed once open (a browser would
/// abort it), so the relay always gets a Close frame, whichever side ended first.
async fn close_end(end: &mut End, code: u16, reason: &str) {
    if let End::Connecting(connecting) = end {
        *end = connecting.await.map_or(End::Gone, End::Open);
    }
    if let End::Open(ws) = end {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.to_owned().into(),
        };
        let _ = ws.send(Message::Close(Some(frame))).await;
    }
}

async fn drain_end(end: &mut End) {
    if let End::Open(ws) = end {
        drain(ws).await;
    }
}

/// Reads until the close handshake completes or the stream ends (bounded).
async fn drain(ws: &mut WsStream) {
    let _ = tokio::time::timeout(DEADLINE, async { while ws.next().await.is_some() {} }).await;
}

/// `ws://127.0.0.1:PORT<path>?token=<secret>&<query minus token>`, built as the
/// client's `URL.searchParams.set` does (a repeated name keeps its last value).
fn local_ws_url(upstream: SocketAddr, path: &str, query: Option<&str>, secret: &str) -> String {
    let mut params = vec![("token".to_owned(), secret.to_owned())];
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (form_decode(name), form_decode(value));
        match params.iter_mut().find(|(n, _)| *n == name) {
            Some(_) if name == "token" => {}
            Some(param) => param.1 = value,
            None => params.push((name, value)),
        }
    }
    let query: Vec<String> = params
        .iter()
        .map(|(n, v)| format!("{}={}", form_encode(n), form_encode(v)))
        .collect();
    format!("ws://{upstream}{path}?{}", query.join("&"))
}

/// `http://host:port/anything` → `ws://host:port` (and https → wss).
fn ws_origin(base: &str) -> String {
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    };
    let authority_at = ws.find("://").map_or(0, |at| at + 3);
    match ws[authority_at..].find('/') {
        Some(slash) => ws[..authority_at + slash].to_owned(),
        None => ws,
    }
}

/// `application/x-www-form-urlencoded`, as `URLSearchParams` serializes.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The inverse of [`form_encode`], lenient as `URLSearchParams` parses.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let hex = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
