//! A stand-in relay for agent tests: a raw WebSocket server whose every answer
//! the test decides.
//!
//! [`StubRelay`] listens on `127.0.0.1:0` and records every upgrade request it
//! gets ([`Attempt`]: when, which URI, which credential). A policy picks the
//! answer per attempt: refuse the upgrade with any status and headers (429
//! with `Retry-After`, 503, 401, ..), or accept it and hand the tunnel to the
//! test as a [`StubTunnel`], which sends whatever the test wants (`drain`,
//! a Close with 4001, nothing at all) and reads what the agent sends.
//!
//! Timestamps are taken when the request head has been read, before the
//! answer is written, so the gap between two attempts as the stub sees it is
//! never shorter than the delay the agent waited.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::DEADLINE;
use crate::wait::{wait_until, within};
use crate::ws::WsEnd;

/// How the stub answers one upgrade request.
#[derive(Debug, Clone)]
pub enum StubReply {
    /// Complete the upgrade; the tunnel goes to the test through
    /// [`StubRelay::next_tunnel`].
    Accept,
    /// Refuse the upgrade with this HTTP status and these headers.
    Refuse {
        /// The status code.
        status: u16,
        /// Extra response headers, e.g. `("retry-after", "2")`.
        headers: Vec<(String, String)>,
    },
}

// === impl StubReply ===

impl StubReply {
    /// A refusal with `status` and `headers`.
    pub fn refuse(status: u16, headers: &[(&str, &str)]) -> Self {
        Self::Refuse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }
}

/// One upgrade request the stub received.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When its request head had been read.
    pub at: Instant,
    /// The request target, e.g. `/tunnel?hostId=h1`.
    pub uri: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Sec-WebSocket-Protocol` the agent asked for, if any (the stub never grants
    /// one: it speaks v1).
    pub subprotocol: Option<String>,
}

// === impl Attempt ===

impl Attempt {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// The value of query parameter `name`, if present (not percent-decoded:
    /// tests use plain values).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let (_, query) = self.uri.split_once('?')?;
        query
            .split('&')
            .find_map(|pair| match pair.split_once('=') {
                Some((key, value)) if key == name => Some(value.to_owned()),
                _ => None,
            })
    }

    /// The credential the agent presented: the bearer token, else the
    /// `token=` query value.
    pub fn token(&self) -> Option<String> {
        self.authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::to_owned)
            .or_else(|| self.query_param("token"))
    }
}

/// Decides the answer to the attempt with this index (0 for the first).
type Policy = dyn Fn(usize) -> StubReply + Send + Sync;

/// A running stub relay; stops listening when dropped (accepted tunnels the
/// test still holds stay open until they are dropped too).
pub struct StubRelay {
    addr: SocketAddr,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    tunnels_rx: mpsc::UnboundedReceiver<StubTunnel>,
    task: JoinHandle<()>,
}

// === impl StubRelay ===

impl StubRelay {
    /// Binds `127.0.0.1:0` and answers attempt `n` with `policy(n)`.
    pub async fn spawn(policy: impl Fn(usize) -> StubReply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stub relay on 127.0.0.1:0");
        let addr = listener.local_addr().expect("stub relay local addr");
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let (tunnels_tx, tunnels_rx) = mpsc::unbounded_channel();
        let policy: Arc<Policy> = Arc::new(policy);
        let task = tokio::spawn(accept_loop(listener, attempts.clone(), policy, tunnels_tx));
        Self {
            addr,
            attempts,
            tunnels_rx,
            task,
        }
    }

    /// A stub that accepts every upgrade.
    pub async fn accepting() -> Self {
        Self::spawn(|_| StubReply::Accept).await
    }

    /// A stub that refuses every upgrade with `status` and `headers`.
    pub async fn refusing(status: u16, headers: &[(&str, &str)]) -> Self {
        let reply = StubReply::refuse(status, headers);
        Self::spawn(move |_| reply.clone()).await
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR`, the base URL to give an agent.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Every upgrade request so far, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().expect("stub state poisoned").clone()
    }

    /// Waits until at least `n` upgrade requests arrived; returns them all.
    ///
    /// # Panics
    ///
    /// If fewer arrive within `timeout`.
    pub async fn wait_attempts(&self, n: usize, timeout: Duration) -> Vec<Attempt> {
        wait_until(
            &format!("the stub relay {} has {n} upgrade attempt(s)", self.addr),
            timeout,
            || self.attempts.lock().expect("stub state poisoned").len() >= n,
        )
        .await;
        self.attempts()
    }

    /// The next accepted tunnel, in acceptance order.
    ///
    /// # Panics
    ///
    /// If none is accepted within [`DEADLINE`].
    pub async fn next_tunnel(&mut self) -> StubTunnel {
        within(
            "the stub relay to accept a tunnel",
            DEADLINE,
            self.tunnels_rx.recv(),
        )
        .await
        .expect("the stub's accept loop is running")
    }
}

impl Drop for StubRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections; each one is handshaken in its own task.
async fn accept_loop(
    listener: TcpListener,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    policy: Arc<Policy>,
    tunnels_tx: mpsc::UnboundedSender<StubTunnel>,
) {
    while let Ok((stream, _peer)) = listener.accept().await {
        let attempts = attempts.clone();
        let policy = policy.clone();
        let tunnels_tx = tunnels_tx.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            // The shape tungstenite's handshake callback must have.
            #[allow(clippy::result_large_err)]
            let callback = |request: &Request, response: Response| {
                let attempt = Attempt {
                    at: Instant::now(),
                    uri: request.uri().to_string(),
                    authorization: request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    subprotocol: request
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                };
                let index = {
                    let mut attempts = attempts.lock().expect("stub state poisoned");
                    attempts.push(attempt);
                    attempts.len() - 1
                };
                match policy(index) {
                    StubReply::Accept => Ok(response),
                    StubReply::Refuse { status, headers } => Err(refusal(status, &headers)),
                }
            };
            // A refusal ends here with an error after the response was written.
            if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                let _ = tunnels_tx.send(StubTunnel {
                    ws,
                    accepted_at: Instant::now(),
                });
            }
        });
    }
}

/// The HTTP response refusing an upgrade.
fn refusal(status: u16, headers: &[(String, String)]) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(format!("stub relay refuses with {status}")));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status code");
    for (name, value) in headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            HeaderValue::from_str(value).expect("a valid header value"),
        );
    }
    response
}

/// One accepted tunnel, server side.
pub struct StubTunnel {
    ws: WebSocketStream<TcpStream>,
    /// When the upgrade completed.
    pub accepted_at: Instant,
}

// === impl StubTunnel ===

impl StubTunnel {
    /// Sends a text frame.
    ///
    /// # Panics
    ///
    /// If the agent is gone.
    pub async fn send_text(&mut self, text: &str) {
        within(
            "a stub tunnel send",
            DEADLINE,
            self.ws.send(Message::text(text)),
        )
        .await
        .unwrap_or_else(|err| panic!("stub tunnel send failed: {err}"));
    }

    /// Sends one v1 message.
    pub async fn send_json(&mut self, msg: &Value) {
        self.send_text(&msg.to_string()).await;
    }

    /// Sends a Close frame with `code` (the handshake completes when the agent
    /// answers; read on with [`ended`](Self::ended) to see it).
    ///
    /// # Panics
    ///
    /// If the agent is gone.
    pub async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        within(
            "a stub tunnel close",
            DEADLINE,
            self.ws.send(Message::Close(Some(frame))),
        )
        .await
        .unwrap_or_else(|err| panic!("stub tunnel close failed: {err}"));
    }

    /// The next text message from the agent parsed as JSON, or how the tunnel
    /// ended; `None` when nothing arrives within `timeout`. WebSocket-level
    /// ping/pong is skipped (and answered by tungstenite).
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Result<Value, WsEnd>> {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return Ok(serde_json::from_str(text.as_str()).unwrap_or_else(|err| {
                            panic!("the agent sent a text frame that is not JSON: {text:?}: {err}")
                        }));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(WsEnd::Close(frame.map_or(1005, |f| u16::from(f.code))));
                    }
                    Some(Ok(Message::Binary(data))) => {
                        panic!("the agent sent a binary frame (not v1): {data:?}")
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(WsEnd::Dropped(err.to_string())),
                    None => return Err(WsEnd::Dropped("end of stream".to_owned())),
                }
            }
        };
        tokio::time::timeout(timeout, next).await.ok()
    }

    /// Reads (and discards messages) until the tunnel ends; returns how.
    ///
    /// # Panics
    ///
    /// If it is still open after `timeout`.
    pub async fn ended(&mut self, timeout: Duration) -> WsEnd {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left).await {
                Some(Ok(_)) => {}
                Some(Err(end)) => return end,
                None => panic!("the stub tunnel was still open after {timeout:?}"),
            }
        }
    }
}
