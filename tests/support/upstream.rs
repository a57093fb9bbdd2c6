//! A real local HTTP and WebSocket server standing in for the service behind
//! a host.
//!
//! Routes:
//! - `ANY /echo` and `ANY /echo/{*rest}`: answers JSON
//!   `{"method","path","query","headers":{name: value},"body"}` describing
//!   the request it got, with the status taken from the `x-status` request
//!   header (default 200) and a response header `x-upstream: echo`.
//! - `GET /slow?ms=N`: sleeps N ms, then answers `slow done`.
//! - `GET /ws/echo`: WebSocket echo of text and binary frames; the text
//!   message `close:<code>` makes it close with that code, the text message
//!   `protocol?` is answered with the subprotocol it chose (`chat.v2` or
//!   `chat.v1`, the first of these the client offered; `none` otherwise).
//!   Close codes it receives from peers are recorded
//!   ([`Upstream::ws_close_codes`]).
//! - `GET /ws/flood?n=N&size=S`: sends N binary messages of S bytes (byte `i`
//!   of message `k` is `(k + i) % 251`), then the text `done`, as fast as the
//!   peer takes them; [`Upstream::flood_sent`] counts the messages sent so far.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Counters and recordings shared with the handlers.
#[derive(Default)]
struct UpstreamState {
    /// HTTP requests served (echo and slow).
    requests: AtomicUsize,
    /// WebSocket connections accepted on `/ws/echo`.
    ws_connections: AtomicUsize,
    /// Close codes received from WebSocket peers (1005 = no code). A std
    /// mutex: held only for a push or a copy, never across an await.
    ws_close_codes: Mutex<Vec<u16>>,
    /// Messages `/ws/flood` has handed to its socket so far.
    flood_sent: AtomicUsize,
}

/// The running upstream server; aborted on drop.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: JoinHandle<()>,
}

// === impl Upstream ===

impl Upstream {
    /// Binds `127.0.0.1:0` and serves in a background task.
    pub async fn spawn() -> Self {
        let state = Arc::new(UpstreamState::default());
        let app = Router::new()
            .route("/echo", any(echo))
            .route("/echo/{*rest}", any(echo))
            .route("/slow", get(slow))
            .route("/ws/echo", get(ws_echo))
            .route("/ws/flood", get(ws_flood))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("upstream local addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("upstream serve");
        });
        Self { addr, state, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HTTP requests served so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// WebSocket connections accepted so far.
    pub fn ws_connections(&self) -> usize {
        self.state.ws_connections.load(Ordering::SeqCst)
    }

    /// Messages `/ws/flood` has sent so far (a send counts once the socket took
    /// it, so a peer that does not read holds this back).
    pub fn flood_sent(&self) -> usize {
        self.state.flood_sent.load(Ordering::SeqCst)
    }

    /// Close codes received from WebSocket peers so far.
    pub fn ws_close_codes(&self) -> Vec<u16> {
        self.state
            .ws_close_codes
            .lock()
            .expect("upstream state poisoned")
            .clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `ANY /echo[/..]`: describes the request as JSON.
async fn echo(
    State(state): State<Arc<UpstreamState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let status = headers
        .get("x-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    let mut header_map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        header_map
            .entry(name.as_str().to_owned())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    let description = json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query().unwrap_or(""),
        "headers": header_map,
        "body": String::from_utf8_lossy(&body),
    });
    (status, [("x-upstream", "echo")], axum::Json(description)).into_response()
}

#[derive(Deserialize)]
struct SlowParams {
    ms: u64,
}

/// `GET /slow?ms=N`.
async fn slow(
    State(state): State<Arc<UpstreamState>>,
    Query(params): Query<SlowParams>,
) -> &'static str {
    state.requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(params.ms)).await;
    "slow done"
}

/// `GET /ws/echo`.
async fn ws_echo(State(state): State<Arc<UpstreamState>>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .protocols(["chat.v2", "chat.v1"])
        .on_upgrade(move |socket| run_ws_echo(socket, state))
}

#[derive(Deserialize)]
struct FloodParams {
    n: usize,
    size: usize,
}

/// `GET /ws/flood?n=N&size=S`.
async fn ws_flood(
    State(state): State<Arc<UpstreamState>>,
    Query(params): Query<FloodParams>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade.on_upgrade(move |mut socket| async move {
        for k in 0..params.n {
            let data: Vec<u8> = (0..params.size).map(|i| ((k + i) % 251) as u8).collect();
            if socket.send(Message::Binary(data.into())).await.is_err() {
                return;
            }
            state.flood_sent.fetch_add(1, Ordering::SeqCst);
        }
        let _ = socket.send(Message::Text("done".into())).await;
        // Wait for the peer's close.
        while let Some(Ok(_)) = socket.recv().await {}
    })
}

/// Echoes until the peer closes or asks for a close with `close:<code>`.
async fn run_ws_echo(mut socket: WebSocket, state: Arc<UpstreamState>) {
    state.ws_connections.fetch_add(1, Ordering::SeqCst);
    let chosen = socket
        .protocol()
        .and_then(|p| p.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(text) if text.as_str() == "protocol?" => {
                Message::Text(chosen.clone().into())
            }
            Message::Text(text) => match text.as_str().strip_prefix("close:") {
                Some(code) => {
                    let code = code.parse::<u16>().expect("close:<u16>");
                    let frame = CloseFrame {
                        code,
                        reason: "".into(),
                    };
                    Message::Close(Some(frame))
                }
                None => Message::Text(text),
            },
            Message::Binary(data) => Message::Binary(data),
            Message::Close(frame) => {
                let code = frame.map_or(1005, |f| f.code);
                state
                    .ws_close_codes
                    .lock()
                    .expect("upstream state poisoned")
                    .push(code);
                // The close reply is sent by the next recv, which then ends.
                continue;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}
