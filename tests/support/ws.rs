//! A WebSocket connection with deadline-bound helpers.
//!
//! [`WsClient`] is what a visitor uses to open a channel through the relay and
//! what [`RawHost`](crate::RawHost) uses for its tunnel. Receives skip
//! WebSocket-level ping/pong (tungstenite answers pings itself) and fail with
//! a clear message on deadline or unexpected end of stream.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{DEADLINE, within};

/// The raw stream type behind [`WsClient`].
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What ended a WebSocket, as observed by the reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEnd {
    /// A Close frame arrived, with this code (`1005` when it carried none).
    Close(u16),
    /// The stream ended or failed without a Close frame.
    Dropped(String),
}

/// One WebSocket connection.
pub struct WsClient {
    stream: WsStream,
}

// === impl WsClient ===

impl WsClient {
    /// Opens a WebSocket to `url` (`ws://..`), optionally with
    /// `Authorization: Bearer <bearer>`, within [`DEADLINE`].
    ///
    /// # Errors
    ///
    /// The handshake error; [`rejection_status`] extracts the HTTP status when
    /// the server refused the upgrade.
    ///
    /// # Panics
    ///
    /// If `url` is malformed or the handshake takes longer than [`DEADLINE`].
    pub async fn connect(url: &str, bearer: Option<&str>) -> Result<Self, tungstenite::Error> {
        Self::connect_with_protocols(url, bearer, &[])
            .await
            .map(|(ws, _)| ws)
    }

    /// Like [`connect`](Self::connect), offering the subprotocols `protocols`
    /// (none when empty); also returns the one the server chose.
    ///
    /// # Errors
    ///
    /// The handshake's error, as for [`connect`](Self::connect).
    pub async fn connect_with_protocols(
        url: &str,
        bearer: Option<&str>,
        protocols: &[&str],
    ) -> Result<(Self, Option<String>), tungstenite::Error> {
        Self::connect_with_headers(url, bearer, protocols, &[]).await
    }

    /// Like [`connect_with_protocols`](Self::connect_with_protocols), also sending
    /// `headers` with the handshake.
    ///
    /// # Errors
    ///
    /// The handshake's error, as for [`connect`](Self::connect).
    pub async fn connect_with_headers(
        url: &str,
        bearer: Option<&str>,
        protocols: &[&str],
        headers: &[(&str, &str)],
    ) -> Result<(Self, Option<String>), tungstenite::Error> {
        let mut request = url
            .into_client_request()
            .unwrap_or_else(|err| panic!("bad WebSocket url {url:?}: {err}"));
        if let Some(token) = bearer {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .expect("token is a valid header value");
            request.headers_mut().insert("authorization", value);
        }
        for (name, value) in headers {
            let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .expect("a valid header name");
            let value = HeaderValue::from_str(value).expect("a valid header value");
            request.headers_mut().insert(name, value);
        }
        if !protocols.is_empty() {
            let value = HeaderValue::from_str(&protocols.join(", "))
                .expect("subprotocols are a valid header value");
            request
                .headers_mut()
                .insert("sec-websocket-protocol", value);
        }
        let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
        let (stream, response) = match tokio::time::timeout(DEADLINE, connect).await {
            Ok(result) => result?,
            Err(_) => panic!("WebSocket handshake with {url} took longer than {DEADLINE:?}"),
        };
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((Self { stream }, chosen))
    }

    /// Like [`connect`](Self::connect) but panics when the upgrade fails.
    ///
    /// # Panics
    ///
    /// If the handshake fails; the message shows the HTTP status if any.
    pub async fn connect_ok(url: &str, bearer: Option<&str>) -> Self {
        match Self::connect(url, bearer).await {
            Ok(ws) => ws,
            Err(err) => panic!(
                "WebSocket upgrade to {} failed (HTTP status {:?}): {err}",
                redact_url(url),
                rejection_status(&err)
            ),
        }
    }

    /// Sends one message.
    ///
    /// # Panics
    ///
    /// If the connection is gone.
    pub async fn send(&mut self, msg: Message) {
        self.try_send(msg)
            .await
            .unwrap_or_else(|err| panic!("WebSocket send failed: {err}"));
    }

    /// Sends one message, returning the error instead of panicking.
    ///
    /// # Errors
    ///
    /// If the connection is gone or the send takes longer than [`DEADLINE`].
    pub async fn try_send(&mut self, msg: Message) -> Result<(), String> {
        match tokio::time::timeout(DEADLINE, self.stream.send(msg)).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(_) => Err(format!("send took longer than {DEADLINE:?}")),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: &[u8]) {
        self.send(Message::binary(Bytes::copy_from_slice(data)))
            .await;
    }

    /// Starts the close handshake with `code`.
    pub async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.send(Message::Close(Some(frame))).await;
    }

    /// The next message that is not a WebSocket ping/pong, or how the stream
    /// ended.
    ///
    /// # Panics
    ///
    /// If nothing arrives within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Message, WsEnd> {
        match self.try_recv(timeout).await {
            Some(result) => result,
            None => panic!("no WebSocket message within {timeout:?}"),
        }
    }

    /// Like [`recv`](Self::recv), but `None` instead of a panic when nothing
    /// arrives within `timeout` (for polling while doing something else).
    /// Cancel safe: a message is never lost by timing out.
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Result<Message, WsEnd>> {
        let next = async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        return Err(WsEnd::Close(frame.map_or(1005, |f| u16::from(f.code))));
                    }
                    Some(Ok(msg)) => return Ok(msg),
                    Some(Err(err)) => return Err(WsEnd::Dropped(err.to_string())),
                    None => return Err(WsEnd::Dropped("end of stream".to_owned())),
                }
            }
        };
        tokio::time::timeout(timeout, next).await.ok()
    }

    /// The next text or binary message.
    ///
    /// # Panics
    ///
    /// If the socket ends instead, or nothing arrives within [`DEADLINE`].
    pub async fn recv_data(&mut self) -> Message {
        match self.recv(DEADLINE).await {
            Ok(msg) => msg,
            Err(end) => panic!("expected a data frame, but the WebSocket ended: {end:?}"),
        }
    }

    /// The next text frame's content.
    ///
    /// # Panics
    ///
    /// If the next data frame is not text, or see [`recv_data`](Self::recv_data).
    pub async fn recv_text(&mut self) -> String {
        match self.recv_data().await {
            Message::Text(text) => text.as_str().to_owned(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads until the peer's Close frame and returns its code, skipping any
    /// data frames on the way.
    ///
    /// # Panics
    ///
    /// If the stream ends without a Close frame or `timeout` passes.
    pub async fn recv_close_code(&mut self, timeout: Duration) -> u16 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Ok(_) => {}
                Err(WsEnd::Close(code)) => return code,
                Err(WsEnd::Dropped(why)) => {
                    panic!("expected a Close frame, but the WebSocket ended without one: {why}")
                }
            }
        }
    }

    /// Reads until the peer's Close frame and returns its code (1005 when it
    /// carried none) and reason, skipping any data frames on the way.
    ///
    /// # Panics
    ///
    /// If the stream ends without a Close frame or `timeout` passes.
    pub async fn recv_close(&mut self, timeout: Duration) -> (u16, String) {
        let close = async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        return frame.map_or((1005, String::new()), |f| {
                            (u16::from(f.code), f.reason.as_str().to_owned())
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        panic!("expected a Close frame, but the WebSocket failed: {err}")
                    }
                    None => panic!("expected a Close frame, but the WebSocket ended"),
                }
            }
        };
        within("a Close frame", timeout, close).await
    }

    /// The underlying stream, for tests that need full control.
    pub fn stream_mut(&mut self) -> &mut WsStream {
        &mut self.stream
    }

    /// Unwraps the underlying stream.
    pub fn into_stream(self) -> WsStream {
        self.stream
    }
}

/// The HTTP status of a refused WebSocket upgrade, if that is what `err` is.
pub fn rejection_status(err: &tungstenite::Error) -> Option<u16> {
    match err {
        tungstenite::Error::Http(response) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// `url` with any `token=` query value replaced, for panic messages (test
/// output is a log too).
pub fn redact_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("token", _)) => "token=REDACTED".to_owned(),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// A WebSocket over an extended CONNECT stream (RFC 8441) of an HTTP/2 connection.
pub type H2WsStream = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Opens a WebSocket to `path` on `addr` as an HTTP/2 client with prior knowledge (h2c)
/// would: a new connection, an extended CONNECT stream with `:protocol websocket`, and,
/// once the relay answers 200, the WebSocket over that stream. `Err` carries the status
/// of a refusal.
///
/// # Panics
/// If the connection or the HTTP/2 handshake fails.
pub async fn connect_h2c(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> Result<H2WsStream, u16> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the relay");
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    // The relay's SETTINGS (which allow extended CONNECT) must have arrived first.
    send.ready().await.expect("the connection is ready");
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{addr}{path}"))
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut request = request
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("a CONNECT request");
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = within("the relay answers the CONNECT", DEADLINE, async {
        send.send_request(request)
            .await
            .expect("the CONNECT is sent")
    })
    .await;
    if response.status() != http::StatusCode::OK {
        return Err(response.status().as_u16());
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .expect("the stream is handed over");
    Ok(WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tungstenite::protocol::Role::Client,
        None,
    )
    .await)
}

/// The head of one whole WebSocket frame of `len` bytes, text or binary, as a client (or
/// a host agent) must send it: masked, here with a zero key, so the payload goes as is.
/// For sending a message's start by hand and never its end.
pub fn masked_frame_head(text: bool, len: u64) -> Vec<u8> {
    let mut head = vec![if text { 0x81 } else { 0x82 }, 0x80 | 127];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&[0, 0, 0, 0]);
    head
}
