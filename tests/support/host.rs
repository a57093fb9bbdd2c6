//! v1 host agents for tests, speaking the tunnel protocol over a real
//! WebSocket (`/tunnel?hostId=..`).
//!
//! - [`RawHost`] is driven message by message from the test: send exactly
//!   this JSON (or these raw bytes), expect exactly that message next, read
//!   the close code. Pings are answered automatically unless turned off.
//! - [`TestHost`] is a well-behaved agent running in background tasks: it
//!   answers pings, forwards `http` messages to an [`Upstream`] over real HTTP
//!   and `ws:open` to a real local WebSocket, carries frames and closes both
//!   ways, and closes its local sockets when the tunnel goes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::DEADLINE;
use crate::client::HttpClient;
use crate::relay_process::TestRelay;
use crate::upstream::Upstream;
use crate::ws::{WsClient, WsEnd};

/// Headers the test host never copies between HTTP hops: hyper computes
/// framing itself, and hop-by-hop headers are per connection.
const NOT_FORWARDED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
];

/// The `type` field of a v1 message (empty if absent).
pub fn msg_type(msg: &Value) -> &str {
    msg.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The `id` field of a v1 message.
///
/// # Panics
///
/// If it has no string `id`.
pub fn msg_id(msg: &Value) -> String {
    match msg.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => panic!("expected a non-empty string `id` in {msg}"),
    }
}

/// The close code a `ws:close` from the relay stands for: its `code`, or for a code an
/// application may not close with (sent as 1000), the original the relay names at the end
/// of `reason` ("try again later (1013)").
///
/// # Panics
///
/// If the message has neither a code nor a code in its reason.
pub fn close_code_of(msg: &Value) -> u64 {
    if let Some(reason) = msg.get("reason").and_then(Value::as_str) {
        assert_eq!(msg["code"], 1000, "a mapped code is sent as 1000: {msg}");
        let code = reason
            .rsplit_once('(')
            .and_then(|(_, code)| code.strip_suffix(')'))
            .and_then(|code| code.parse().ok());
        return code.unwrap_or_else(|| panic!("no original code in the reason of {msg}"));
    }
    msg["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no close code in {msg}"))
}

/// A host agent driven message by message.
pub struct RawHost {
    ws: WsClient,
    auto_pong: bool,
    pings: usize,
}

// === impl RawHost ===

impl RawHost {
    /// Opens a tunnel for `host_id` with a valid host token (in the query)
    /// and waits until the relay has registered it.
    pub async fn connect(relay: &TestRelay, host_id: &str) -> Self {
        let host =
            Self::connect_url(&relay.tunnel_url(host_id, &relay.host_token(host_id)), None).await;
        relay.wait_host_connected(host_id).await;
        host
    }

    /// Opens a tunnel WebSocket to `url`, optionally with a bearer token,
    /// without waiting for registration (use this for rejected tunnels).
    ///
    /// # Panics
    ///
    /// If the WebSocket upgrade itself fails (the relay must upgrade even
    /// when it is going to refuse the tunnel with 1008).
    pub async fn connect_url(url: &str, bearer: Option<&str>) -> Self {
        Self {
            ws: WsClient::connect_ok(url, bearer).await,
            auto_pong: true,
            pings: 0,
        }
    }

    /// Whether pings are answered with pongs (default: yes).
    pub fn set_auto_pong(&mut self, on: bool) {
        self.auto_pong = on;
    }

    /// How many `{"type":"ping"}` messages arrived so far.
    pub fn pings_seen(&self) -> usize {
        self.pings
    }

    /// Sends `msg` as one text frame.
    pub async fn send_json(&mut self, msg: &Value) {
        self.ws.send_text(&msg.to_string()).await;
    }

    /// Sends a raw text frame (for malformed input).
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send_text(text).await;
    }

    /// Sends `{"type":"http:response",..}` for exchange `id`.
    pub async fn respond(&mut self, id: &str, status: u16, headers: Value, body: &str) {
        self.send_json(&json!({
            "type": "http:response",
            "id": id,
            "status": status,
            "headers": headers,
            "body": body,
        }))
        .await;
    }

    /// The next v1 message, pings included (counted, not answered).
    ///
    /// # Errors
    ///
    /// How the tunnel ended, if it did.
    ///
    /// # Panics
    ///
    /// On a non-JSON or non-text frame, or if nothing arrives within `timeout`.
    pub async fn recv_raw(&mut self, timeout: Duration) -> Result<Value, WsEnd> {
        let msg: Value = match self.ws.recv(timeout).await? {
            Message::Text(text) => serde_json::from_str(text.as_str())
                .unwrap_or_else(|err| panic!("relay sent a non-JSON text frame {text:?}: {err}")),
            other => panic!("relay sent a non-text frame on the tunnel: {other:?}"),
        };
        if msg_type(&msg) == "ping" {
            self.pings += 1;
        }
        Ok(msg)
    }

    /// The next message that is not a ping, answering pings on the way if
    /// auto-pong is on.
    ///
    /// # Panics
    ///
    /// If the tunnel ends or nothing arrives within `timeout`.
    pub async fn recv_json_within(&mut self, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_raw(left).await {
                Ok(msg) if msg_type(&msg) == "ping" => self.on_ping().await,
                Ok(msg) => return msg,
                Err(end) => panic!("expected a message on the tunnel, but it ended: {end:?}"),
            }
        }
    }

    /// The next non-ping message if one arrives within `timeout`, else `None`
    /// (for polling while sending). Pings are handled as in
    /// [`recv_json_within`](Self::recv_json_within).
    ///
    /// # Panics
    ///
    /// If the tunnel ends.
    pub async fn try_recv_json(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let msg = match self.ws.try_recv(timeout).await? {
                Ok(Message::Text(text)) => serde_json::from_str::<Value>(text.as_str())
                    .unwrap_or_else(|err| {
                        panic!("relay sent a non-JSON text frame {text:?}: {err}")
                    }),
                Ok(other) => panic!("relay sent a non-text frame on the tunnel: {other:?}"),
                Err(end) => panic!("expected a message on the tunnel, but it ended: {end:?}"),
            };
            if msg_type(&msg) == "ping" {
                self.pings += 1;
                self.on_ping().await;
                continue;
            }
            return Some(msg);
        }
    }

    /// [`recv_json_within`](Self::recv_json_within) with [`DEADLINE`].
    pub async fn recv_json(&mut self) -> Value {
        self.recv_json_within(DEADLINE).await
    }

    /// The next message, which must be of type `ty`.
    ///
    /// # Panics
    ///
    /// If it is of another type.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let msg = self.recv_json().await;
        assert_eq!(
            msg_type(&msg),
            ty,
            "unexpected message on the tunnel: {msg}"
        );
        msg
    }

    /// Reads until the relay's Close frame and returns its code. Pings are
    /// counted (and answered if auto-pong is on); other messages are skipped.
    ///
    /// # Panics
    ///
    /// If the tunnel ends without a Close frame or `timeout` passes.
    pub async fn recv_close_code(&mut self, timeout: Duration) -> u16 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_raw(left).await {
                Ok(msg) if msg_type(&msg) == "ping" => self.on_ping().await,
                Ok(_) => {}
                Err(WsEnd::Close(code)) => return code,
                Err(WsEnd::Dropped(why)) => {
                    panic!("expected a Close frame on the tunnel, but it ended without one: {why}")
                }
            }
        }
    }

    /// Closes the tunnel with `code` (the relay should then deregister).
    pub async fn close(&mut self, code: u16) {
        self.ws.close(code).await;
    }

    /// The underlying WebSocket.
    pub fn ws_mut(&mut self) -> &mut WsClient {
        &mut self.ws
    }

    async fn on_ping(&mut self) {
        if self.auto_pong {
            // The relay may already be closing; a failed pong is not an error here.
            let _ = self
                .ws
                .try_send(Message::text(json!({"type": "pong"}).to_string()))
                .await;
        }
    }
}

/// What the tunnel reader tells a local channel task.
enum ChannelCmd {
    /// A frame for the local socket.
    Frame(Message),
    /// The client closed; close the local socket with this code.
    Close(Option<u16>),
}

/// Local WebSocket channels by relay channel id. A std mutex: only held for
/// map operations, never across an await. Dropping a sender tells the channel
/// task that the tunnel is gone.
type Channels = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<ChannelCmd>>>>;

/// A well-behaved v1 host agent running in background tasks.
pub struct TestHost {
    out_tx: mpsc::UnboundedSender<Message>,
    pings: Arc<AtomicUsize>,
    end_rx: watch::Receiver<Option<WsEnd>>,
    seen: Arc<Mutex<Vec<Value>>>,
    channels: Channels,
    tasks: Vec<JoinHandle<()>>,
}

// === impl TestHost ===

impl TestHost {
    /// Opens a tunnel for `host_id` with a valid host token, forwarding to
    /// `upstream`, and waits until the relay has registered it.
    pub async fn connect(relay: &TestRelay, host_id: &str, upstream: &Upstream) -> Self {
        let url = relay.tunnel_url(host_id, &relay.host_token(host_id));
        let host = Self::connect_url(&url, None, upstream.addr()).await;
        relay.wait_host_connected(host_id).await;
        host
    }

    /// Opens a tunnel WebSocket to `url` without waiting for registration.
    pub async fn connect_url(url: &str, bearer: Option<&str>, upstream: SocketAddr) -> Self {
        let ws = WsClient::connect_ok(url, bearer).await;
        let (mut sink, mut stream) = ws.into_stream().split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (end_tx, end_rx) = watch::channel(None);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let channels = Channels::default();
        let pings = Arc::new(AtomicUsize::new(0));

        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(msg).await.is_err() {
                    return;
                }
            }
        });

        let reader = {
            let out_tx = out_tx.clone();
            let seen = seen.clone();
            let channels = channels.clone();
            let pings = pings.clone();
            let http = HttpClient::new();
            tokio::spawn(async move {
                let end = loop {
                    match stream.next().await {
                        Some(Ok(Message::Text(text))) => {
                            let Ok(msg) = serde_json::from_str::<Value>(text.as_str()) else {
                                continue;
                            };
                            if msg_type(&msg) == "ping" {
                                pings.fetch_add(1, Ordering::SeqCst);
                                let pong = json!({"type": "pong"}).to_string();
                                let _ = out_tx.send(Message::text(pong));
                                continue;
                            }
                            handle_relay_message(msg, &out_tx, &seen, &channels, &http, upstream);
                        }
                        Some(Ok(Message::Close(frame))) => {
                            break WsEnd::Close(frame.map_or(1005, |f| u16::from(f.code)));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(err)) => break WsEnd::Dropped(err.to_string()),
                        None => break WsEnd::Dropped("end of stream".to_owned()),
                    }
                };
                // The tunnel is gone: every local socket closes.
                channels.lock().expect("channels poisoned").clear();
                let _ = end_tx.send(Some(end));
                // Keep reading so tungstenite completes the close handshake.
                finish_close(&mut stream).await;
            })
        };

        Self {
            out_tx,
            pings,
            end_rx,
            seen,
            channels,
            tasks: vec![writer, reader],
        }
    }

    /// How many pings it has answered.
    pub fn pings_answered(&self) -> usize {
        self.pings.load(Ordering::SeqCst)
    }

    /// Every non-ping message received from the relay so far.
    pub fn seen(&self) -> Vec<Value> {
        self.seen.lock().expect("seen poisoned").clone()
    }

    /// How many messages of type `ty` arrived so far.
    pub fn seen_of_type(&self, ty: &str) -> usize {
        self.seen().iter().filter(|m| msg_type(m) == ty).count()
    }

    /// Starts closing the tunnel with `code`.
    pub fn close(&self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.out_tx.send(Message::Close(Some(frame)));
    }

    /// Sends a raw message on the tunnel.
    pub fn send(&self, msg: Message) {
        let _ = self.out_tx.send(msg);
    }

    /// How the tunnel ended, if it has.
    pub fn ended(&self) -> Option<WsEnd> {
        self.end_rx.borrow().clone()
    }

    /// Waits for the tunnel to end and returns how.
    ///
    /// # Panics
    ///
    /// If it is still up after `timeout`.
    pub async fn wait_ended(&self, timeout: Duration) -> WsEnd {
        let mut end_rx = self.end_rx.clone();
        let ended = tokio::time::timeout(timeout, end_rx.wait_for(Option::is_some)).await;
        match ended {
            Ok(Ok(end)) => end.clone().expect("checked by wait_for"),
            Ok(Err(_)) => {
                panic!("test host reader vanished without reporting how the tunnel ended")
            }
            Err(_) => panic!("tunnel still up after {timeout:?}"),
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.channels.lock().expect("channels poisoned").clear();
    }
}

/// Dispatches one relay → host message.
fn handle_relay_message(
    msg: Value,
    out_tx: &mpsc::UnboundedSender<Message>,
    seen: &Arc<Mutex<Vec<Value>>>,
    channels: &Channels,
    http: &HttpClient,
    upstream: SocketAddr,
) {
    let ty = msg_type(&msg).to_owned();
    seen.lock().expect("seen poisoned").push(msg.clone());
    let id = msg
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    match ty.as_str() {
        "http" => {
            tokio::spawn(forward_http(msg, http.clone(), upstream, out_tx.clone()));
        }
        "ws:open" => {
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            channels
                .lock()
                .expect("channels poisoned")
                .insert(id.clone(), cmd_tx);
            let path = msg.get("path").and_then(Value::as_str).unwrap_or("/");
            let url = match msg.get("query").and_then(Value::as_str) {
                Some(query) if !query.is_empty() => format!("ws://{upstream}{path}?{query}"),
                _ => format!("ws://{upstream}{path}"),
            };
            tokio::spawn(run_channel(
                id,
                url,
                cmd_rx,
                out_tx.clone(),
                channels.clone(),
            ));
        }
        "ws:frame" => {
            let data = msg.get("data").and_then(Value::as_str).unwrap_or("");
            let frame = if msg.get("encoding").and_then(Value::as_str) == Some("base64") {
                let bytes = BASE64
                    .decode(data)
                    .unwrap_or_else(|err| panic!("relay sent invalid base64 in {msg}: {err}"));
                Message::binary(bytes)
            } else {
                Message::text(data)
            };
            if let Some(tx) = channels.lock().expect("channels poisoned").get(&id) {
                let _ = tx.send(ChannelCmd::Frame(frame));
            }
        }
        "ws:close" => {
            let code = msg
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok());
            if let Some(tx) = channels.lock().expect("channels poisoned").remove(&id) {
                let _ = tx.send(ChannelCmd::Close(code));
            }
        }
        _ => {}
    }
}

/// Carries one `http` exchange to the upstream and answers it.
async fn forward_http(
    msg: Value,
    http: HttpClient,
    upstream: SocketAddr,
    out_tx: mpsc::UnboundedSender<Message>,
) {
    let id = msg_id(&msg);
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("GET");
    let path = msg.get("path").and_then(Value::as_str).unwrap_or("/");
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{upstream}{path}"));
    if let Some(Value::Object(headers)) = msg.get("headers") {
        for (name, value) in headers {
            if let (false, Some(value)) = (NOT_FORWARDED.contains(&name.as_str()), value.as_str()) {
                req = req.header(name.as_str(), value);
            }
        }
    }
    let body = msg
        .get("body")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let reply = match req.body(Full::new(Bytes::from(body))) {
        Err(err) => error_response(
            &id,
            &format!("test host could not build the request: {err}"),
        ),
        Ok(req) => match http.send(req, DEADLINE * 6).await {
            Err(err) => error_response(&id, &err),
            Ok(resp) => {
                let mut headers = Map::new();
                for (name, value) in &resp.headers {
                    if NOT_FORWARDED.contains(&name.as_str()) {
                        continue;
                    }
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    match headers.get_mut(name.as_str()) {
                        Some(Value::String(existing)) => {
                            existing.push_str(", ");
                            existing.push_str(&value);
                        }
                        _ => {
                            headers.insert(name.as_str().to_owned(), Value::String(value));
                        }
                    }
                }
                json!({
                    "type": "http:response",
                    "id": id,
                    "status": resp.status.as_u16(),
                    "headers": headers,
                    "body": resp.text(),
                })
            }
        },
    };
    let _ = out_tx.send(Message::text(reply.to_string()));
}

/// A 502 `http:response` for exchanges the test host could not complete.
fn error_response(id: &str, error: &str) -> Value {
    json!({
        "type": "http:response",
        "id": id,
        "status": 502,
        "headers": {"content-type": "text/plain"},
        "body": error,
    })
}

/// One client channel: a local WebSocket to the upstream, bridged to the
/// tunnel. Ends when either side closes or the tunnel goes (sender dropped).
async fn run_channel(
    id: String,
    url: String,
    mut cmd_rx: mpsc::UnboundedReceiver<ChannelCmd>,
    out_tx: mpsc::UnboundedSender<Message>,
    channels: Channels,
) {
    let send_close = |code: Option<u16>| {
        let mut msg = json!({"type": "ws:close", "id": id});
        if let Some(code) = code {
            msg["code"] = json!(code);
        }
        let _ = out_tx.send(Message::text(msg.to_string()));
    };
    let local = match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url.as_str()))
        .await
    {
        Ok(Ok((local, _))) => local,
        _ => {
            channels.lock().expect("channels poisoned").remove(&id);
            send_close(Some(1011));
            return;
        }
    };
    let (mut local_tx, mut local_rx) = local.split();
    loop {
        tokio::select! {
            cmd = cmd_rx.recv() => match cmd {
                Some(ChannelCmd::Frame(frame)) => {
                    let _ = local_tx.send(frame).await;
                }
                Some(ChannelCmd::Close(code)) => {
                    let frame = code.map(|code| CloseFrame { code: CloseCode::from(code), reason: "".into() });
                    let _ = local_tx.send(Message::Close(frame)).await;
                    finish_close(&mut local_rx).await;
                    return;
                }
                None => {
                    // The tunnel went away.
                    let frame = CloseFrame { code: CloseCode::Away, reason: "".into() };
                    let _ = local_tx.send(Message::Close(Some(frame))).await;
                    finish_close(&mut local_rx).await;
                    return;
                }
            },
            msg = local_rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let msg = json!({"type": "ws:frame", "id": id, "data": text.as_str()});
                    let _ = out_tx.send(Message::text(msg.to_string()));
                }
                Some(Ok(Message::Binary(data))) => {
                    let msg = json!({
                        "type": "ws:frame",
                        "id": id,
                        "data": BASE64.encode(&data),
                        "encoding": "base64",
                    });
                    let _ = out_tx.send(Message::text(msg.to_string()));
                }
                Some(Ok(Message::Close(frame))) => {
                    channels.lock().expect("channels poisoned").remove(&id);
                    send_close(frame.map(|f| u16::from(f.code)));
                    // Let tungstenite send the close reply.
                    let _ = local_tx.flush().await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    channels.lock().expect("channels poisoned").remove(&id);
                    send_close(None);
                    return;
                }
            },
        }
    }
}

/// Reads the local socket until the close handshake completes (bounded).
async fn finish_close<S>(local_rx: &mut S)
where
    S: futures_util::Stream + Unpin,
{
    let _ =
        tokio::time::timeout(DEADLINE, async { while local_rx.next().await.is_some() {} }).await;
}
