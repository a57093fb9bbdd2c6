//! Host agents speaking the v1 JSON protocol, as the bench needs them:
//!
//! - [`ForwardingHost`]: one tunnel that forwards every `http` message to the upstream
//!   with a pooled HTTP client. Built not to be the bottleneck: the reader only parses
//!   and spawns, each exchange runs in its own task, and one writer task owns the socket's
//!   sink, batching whatever is queued into one flush.
//! - [`IdleTunnels`]: many lightweight tunnels that only answer `ping` (and `http`, so
//!   the bench can prove one is routable).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize, Serializer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const PONG: &str = r#"{"type":"pong"}"#;

/// Messages written in one flush by the forwarding host's writer.
const WRITE_BATCH: usize = 64;

/// A relay → host message; only the fields the bench uses.
#[derive(Deserialize)]
struct Inbound {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

/// A v1 `http:response`.
#[derive(Serialize)]
struct HttpResponseOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    status: u16,
    headers: HeadersOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

/// Response headers as a JSON object (values of a repeated header joined by ", ").
struct HeadersOut<'a>(Option<&'a http::HeaderMap>);

impl Serialize for HeadersOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(map) = self.0 else {
            return serializer.collect_map(std::iter::empty::<(&str, &str)>());
        };
        serializer.collect_map(map.keys().map(|name| {
            let mut values = map.get_all(name).iter().filter_map(|v| v.to_str().ok());
            let first = values.next().unwrap_or("").to_owned();
            let joined = values.fold(first, |mut acc, v| {
                acc.push_str(", ");
                acc.push_str(v);
                acc
            });
            (name.as_str(), joined)
        }))
    }
}

fn response_json(id: &str, status: u16, headers: Option<&http::HeaderMap>, body: &[u8]) -> String {
    use base64::Engine as _;
    let encoded;
    let (body, encoding) = match std::str::from_utf8(body) {
        Ok(text) => (text, None),
        Err(_) => {
            encoded = base64::engine::general_purpose::STANDARD.encode(body);
            (encoded.as_str(), Some("base64"))
        }
    };
    serde_json::to_string(&HttpResponseOut {
        kind: "http:response",
        id,
        status,
        headers: HeadersOut(headers),
        body: (!body.is_empty()).then_some(body),
        encoding,
    })
    .expect("a response always serializes")
}

/// Opens a v1 tunnel for `host_id`.
async fn connect(
    relay: SocketAddr,
    host_id: &str,
    token: &str,
    config: Option<WebSocketConfig>,
) -> Result<Socket> {
    connect_with(relay, host_id, token, config, IdleProtocol::V1).await
}

/// What the idle tunnels speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleProtocol {
    /// v1 JSON.
    V1,
    /// HTTP/2 inside the tunnel (`relay-h2`), the handshake done with the `h2` crate.
    H2,
}

async fn connect_with(
    relay: SocketAddr,
    host_id: &str,
    token: &str,
    config: Option<WebSocketConfig>,
    protocol: IdleProtocol,
) -> Result<Socket> {
    let mut request = format!("ws://{relay}/tunnel?hostId={host_id}").into_client_request()?;
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    if protocol == IdleProtocol::H2 {
        request.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            relay::protocol::h2::SUBPROTOCOL.parse()?,
        );
    }
    let (socket, _response) =
        tokio_tungstenite::connect_async_with_config(request, config, true).await?;
    Ok(socket)
}

/// How long one idle tunnel may take to open, retries included.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// The `Retry-After` of a refused handshake (429 or 503), if it had one.
fn retry_after(err: &anyhow::Error) -> Option<Duration> {
    use tokio_tungstenite::tungstenite::Error;
    let Some(Error::Http(response)) = err.downcast_ref::<Error>() else {
        return None;
    };
    let status = response.status().as_u16();
    if status != 429 && status != 503 {
        return None;
    }
    let secs = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Some(Duration::from_millis(secs.max(1) * 1_000))
}

/// One tunnel forwarding every exchange to the upstream.
pub struct ForwardingHost {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl ForwardingHost {
    /// Connects a tunnel for `host_id` and starts serving it.
    ///
    /// # Errors
    /// When the WebSocket handshake fails.
    pub async fn connect(
        relay: SocketAddr,
        host_id: &str,
        token: &str,
        upstream: SocketAddr,
    ) -> Result<ForwardingHost> {
        let socket = connect(relay, host_id, token, None)
            .await
            .with_context(|| format!("tunnel for {host_id} refused"))?;
        let (mut sink, mut source) = socket.split();
        let (tx, mut rx) = mpsc::channel::<String>(4_096);

        let writer = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                if sink.feed(Message::text(first)).await.is_err() {
                    return;
                }
                let mut batch = 1;
                let mut yielded = false;
                while batch < WRITE_BATCH {
                    let next = match rx.try_recv() {
                        Ok(next) => next,
                        // Let the exchanges that are about to answer queue up first: one
                        // write for several responses costs far less than one each.
                        Err(_) if !yielded => {
                            yielded = true;
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Err(_) => break,
                    };
                    if sink.feed(Message::text(next)).await.is_err() {
                        return;
                    }
                    batch += 1;
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        });

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1_024)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let base = format!("http://{upstream}");

        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = source.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(inbound) = serde_json::from_str::<Inbound>(text.as_str()) else {
                    continue;
                };
                match inbound.kind.as_str() {
                    "ping" => {
                        let sent = tx.send(PONG.to_owned()).await;
                        if sent.is_err() {
                            return;
                        }
                    }
                    "http" => {
                        let client = client.clone();
                        let tx = tx.clone();
                        let base = base.clone();
                        tokio::spawn(async move {
                            let reply = forward(&client, &base, inbound).await;
                            let _ = tx.send(reply).await;
                        });
                    }
                    _ => {}
                }
            }
        });
        Ok(ForwardingHost { reader, writer })
    }
}

impl Drop for ForwardingHost {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Headers a proxy does not forward (hop-by-hop, and framing the client recomputes).
fn skip_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-connection"
    )
}

/// Carries one `http` message to the upstream; returns the `http:response` to send.
async fn forward(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    message: Inbound,
) -> String {
    let id = message.id.unwrap_or_default();
    let path = message.path.unwrap_or_else(|| "/".to_owned());
    let method = message.method.unwrap_or_else(|| "GET".to_owned());
    let mut request = http::Request::builder()
        .method(method.as_str())
        .uri(format!("{base}{path}"));
    for (name, value) in &message.headers {
        if !skip_header(&name.to_ascii_lowercase()) {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    let body = Full::new(Bytes::from(message.body.unwrap_or_default()));
    let result = async {
        let response = client.request(request.body(body)?).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((parts, body))
    }
    .await;
    match result {
        Ok((parts, body)) => response_json(&id, parts.status.as_u16(), Some(&parts.headers), &body),
        Err(err) => response_json(&id, 502, None, format!("upstream failed: {err}").as_bytes()),
    }
}

/// Many idle tunnels. Closed (sockets dropped) when dropped.
pub struct IdleTunnels {
    tasks: Vec<JoinHandle<()>>,
}

impl IdleTunnels {
    /// Opens one tunnel per id, at most `concurrency` handshakes at a time; each tunnel
    /// then answers pings (and `http` with a tiny 200) until dropped.
    ///
    /// # Errors
    /// When a tunnel cannot be opened after a few tries.
    pub async fn open(
        relay: SocketAddr,
        ids: Vec<String>,
        token: &str,
        concurrency: usize,
        protocol: IdleProtocol,
    ) -> Result<IdleTunnels> {
        // Small buffers: these are many and idle.
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        let sockets: Vec<Result<Socket>> = stream::iter(ids)
            .map(|id| async move {
                let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
                let mut attempt = 0u64;
                loop {
                    let err = match connect_with(relay, &id, token, Some(config), protocol).await {
                        Ok(socket) => return Ok(socket),
                        Err(err) => err,
                    };
                    attempt += 1;
                    // A relay pacing registrations answers 429/503 with Retry-After.
                    let wait =
                        retry_after(&err).unwrap_or(Duration::from_millis(50 * attempt.min(10)));
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(err.context(format!(
                            "tunnel for {id} not open after {attempt} attempts"
                        )));
                    }
                    tokio::time::sleep(wait).await;
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut tasks = Vec::with_capacity(sockets.len());
        let mut first_error = None;
        for socket in sockets {
            match socket {
                Ok(socket) => tasks.push(match protocol {
                    IdleProtocol::V1 => tokio::spawn(idle(socket)),
                    IdleProtocol::H2 => tokio::spawn(idle_h2(socket)),
                }),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let tunnels = IdleTunnels { tasks };
        match first_error {
            Some(err) => Err(err),
            None => Ok(tunnels),
        }
    }

    /// How many tunnels are open.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
}

impl Drop for IdleTunnels {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An idle `h2` tunnel, as `relay agent` keeps one: no HTTP/2 connection until the relay
/// starts one, then an HTTP/2 server (the `h2` crate) answering every request `200 idle`
/// until the relay ends it; every `ping` answered with `pong`.
async fn idle_h2(socket: Socket) {
    use relay::protocol::h2::{Idle, TunnelIo};
    let (tunnel, control, mut inbox) = TunnelIo::new(socket, || {});
    let control_task = async move {
        while let Some(text) = inbox.recv().await {
            if text.contains("\"ping\"") {
                control.send_text(PONG.to_owned());
            }
        }
    };
    let server = async move {
        loop {
            match tunnel.idle().await {
                Idle::Started => {}
                Idle::PeerEnded => continue,
                Idle::Ended => return,
            }
            let io = tunnel.start_connection();
            tunnel.end_on_shutdown();
            let Ok(mut conn) = h2::server::handshake(io).await else {
                return;
            };
            while let Some(Ok((_request, mut respond))) = conn.accept().await {
                let response = http::Response::new(());
                if let Ok(mut body) = respond.send_response(response, false) {
                    let _ = body.send_data(Bytes::from_static(b"idle"), true);
                }
            }
        }
    };
    tokio::join!(control_task, server);
}

async fn idle(mut socket: Socket) {
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(inbound) = serde_json::from_str::<Inbound>(text.as_str()) else {
            continue;
        };
        let reply = match inbound.kind.as_str() {
            "ping" => PONG.to_owned(),
            "http" => response_json(&inbound.id.unwrap_or_default(), 200, None, b"idle"),
            _ => continue,
        };
        if socket.send(Message::text(reply)).await.is_err() {
            return;
        }
    }
}
