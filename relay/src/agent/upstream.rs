//! The local service: HTTP exchanges over a pooled client, and WebSocket channels.
//!
//! Nothing here can take a tunnel down: an upstream that is down, refuses, times out or
//! answers something v1 cannot carry becomes a `502` for that one exchange (or a
//! `ws:close` 1011 for that one channel), never an error of the tunnel.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::config::UpstreamUrl;
use super::wire::{HeaderValue, ResponseHeaders, ToRelay};
use crate::limits::agent::{
    CLOSE_GRACE, MAX_CHANNEL_MESSAGE, MAX_RESPONSE_BYTES, MAX_TUNNEL_MESSAGE,
    UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_POOL_IDLE, UPSTREAM_TIMEOUT,
};
use crate::protocol::{Encoding, Frame, Headers, close_code, encode_base64};

/// At most one warning per this interval about a failing upstream: when the service is
/// down every request fails, and the log must not drown.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Request headers never forwarded: hop-by-hop ones (RFC 9110 §7.6.1), `host` (the client
/// computes it for the upstream) and `content-length` (the body is whole; hyper frames it).
const SKIPPED_REQUEST_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Response headers never sent back: hop-by-hop ones, and `content-length` (the relay
/// frames the response itself and drops it anyway).
const SKIPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// One exchange as the relay asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Host-local path plus `?query`.
    pub path: String,
    /// Request headers.
    pub headers: Headers,
    /// Request body.
    pub body: Vec<u8>,
}

/// The upstream's answer, ready for `http:response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers, grouped per name.
    pub headers: ResponseHeaders,
    /// The whole body.
    pub body: Bytes,
}

/// The local service and a connection pool to it. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Upstream {
    url: UpstreamUrl,
    client: Client<HttpConnector, Full<Bytes>>,
    /// When the last upstream failure was logged at WARN, and how many were not since.
    /// A std Mutex: held for two field writes, never across an await.
    last_warn: Mutex<(Option<Instant>, u64)>,
}

// === impl Upstream ===

impl Upstream {
    /// A pooled client for `url`.
    pub fn new(url: UpstreamUrl) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(UPSTREAM_POOL_IDLE)
            .build(connector);
        Upstream {
            url,
            client,
            last_warn: Mutex::new((None, 0)),
        }
    }

    /// The local service's base URL.
    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// Forwards one exchange. Always yields a response: failures become 502 (or 400 for a
    /// request that cannot be expressed at all) with a short text body.
    pub async fn exchange(&self, request: Request) -> Response {
        let http_request = match build_request(&self.url, request) {
            Ok(r) => r,
            Err(why) => return text_response(400, why),
        };
        let result = timeout(UPSTREAM_TIMEOUT, async {
            let response = self
                .client
                .request(http_request)
                .await
                .map_err(|e| super::error_chain(&e))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("response body over {MAX_RESPONSE_BYTES} bytes")
                    } else {
                        format!("reading the response body: {e}")
                    }
                })?
                .to_bytes();
            Ok::<_, String>(Response {
                status: parts.status.as_u16(),
                headers: response_headers(&parts.headers),
                body,
            })
        })
        .await;
        match result {
            Ok(Ok(response)) => response,
            Ok(Err(why)) => {
                self.warn_failure(&why);
                text_response(502, "upstream unavailable")
            }
            Err(_) => {
                self.warn_failure(&format!("no response within {UPSTREAM_TIMEOUT:?}"));
                text_response(502, "upstream timed out")
            }
        }
    }

    fn warn_failure(&self, why: &str) {
        let now = Instant::now();
        let suppressed = {
            let mut last = self
                .last_warn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match last.0 {
                Some(at) if now.duration_since(at) < WARN_INTERVAL => {
                    last.1 += 1;
                    None
                }
                _ => {
                    last.0 = Some(now);
                    Some(std::mem::take(&mut last.1))
                }
            }
        };
        match suppressed {
            Some(suppressed) => {
                warn!(upstream = %self.url, error = why, suppressed, "upstream request failed; answered 502");
            }
            None => {
                debug!(upstream = %self.url, error = why, "upstream request failed; answered 502")
            }
        }
    }
}

/// The hyper request for one exchange.
fn build_request(
    url: &UpstreamUrl,
    request: Request,
) -> Result<http::Request<Full<Bytes>>, &'static str> {
    let method =
        http::Method::from_bytes(request.method.as_bytes()).map_err(|_| "invalid method")?;
    let uri: http::Uri = url
        .http_url(&request.path)
        .parse()
        .map_err(|_| "invalid path")?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in &request.headers.0 {
            if SKIPPED_REQUEST_HEADERS
                .iter()
                .any(|s| name.eq_ignore_ascii_case(s))
            {
                continue;
            }
            // A header the relay let through but HTTP cannot carry is dropped, not fatal.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
    }
    builder
        .body(Full::new(Bytes::from(request.body)))
        .map_err(|_| "invalid request")
}

/// Groups response headers per name: repeated values joined with `, `, except
/// `set-cookie`, whose values cannot be joined and go as an array.
fn response_headers(map: &HeaderMap) -> ResponseHeaders {
    let mut out = Vec::with_capacity(map.keys_len());
    for name in map.keys() {
        if SKIPPED_RESPONSE_HEADERS.contains(&name.as_str()) {
            continue;
        }
        // v1 headers are JSON strings: values that are not text are dropped.
        let values: Vec<String> = map
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        if values.is_empty() {
            continue;
        }
        let value = if name == header::SET_COOKIE {
            HeaderValue::Many(values)
        } else {
            HeaderValue::One(values.join(", "))
        };
        out.push((name.as_str().to_owned(), value));
    }
    ResponseHeaders(out)
}

/// A short plain-text answer the agent makes itself.
fn text_response(status: u16, body: &str) -> Response {
    Response {
        status,
        headers: ResponseHeaders(vec![(
            "content-type".into(),
            HeaderValue::One("text/plain; charset=utf-8".into()),
        )]),
        body: Bytes::from(format!("{body}\n")),
    }
}

/// The `http:response` text for `response`: a UTF-8 body as-is, any other as base64. One
/// that would not fit a relay frame becomes a 502 (the relay would close the whole tunnel
/// over a frame that large).
pub fn response_json(id: &str, response: &Response) -> String {
    let text = match std::str::from_utf8(&response.body) {
        Ok("") => http_response_json(id, response, None, None),
        Ok(text) => http_response_json(id, response, Some(text), None),
        Err(_) => http_response_json(
            id,
            response,
            Some(&encode_base64(&response.body)),
            Some(Encoding::Base64),
        ),
    };
    if text.len() <= MAX_TUNNEL_MESSAGE {
        return text;
    }
    warn!(
        bytes = text.len(),
        "upstream response too large for one tunnel frame; answered 502"
    );
    let too_large = text_response(502, "upstream response too large");
    http_response_json(
        id,
        &too_large,
        std::str::from_utf8(&too_large.body).ok(),
        None,
    )
}

fn http_response_json(
    id: &str,
    response: &Response,
    body: Option<&str>,
    encoding: Option<Encoding>,
) -> String {
    ToRelay::HttpResponse {
        id,
        status: response.status,
        headers: &response.headers,
        body,
        encoding,
    }
    .to_json()
}

/// What the tunnel tells one channel.
#[derive(Debug)]
pub enum ChannelCommand {
    /// A client frame to pass on.
    Frame(Frame),
    /// The client closed (with its code): close the local socket.
    Close(Option<u16>),
}

/// One channel's wiring to its tunnel.
#[derive(Debug)]
pub struct ChannelIo {
    /// The channel id on the tunnel.
    pub id: String,
    /// Client frames and the client's close, in order.
    pub commands: mpsc::Receiver<ChannelCommand>,
    /// Fires (with the code to close with) when the tunnel gives up on this channel out
    /// of band (its queue overflowed).
    pub kill: oneshot::Receiver<u16>,
    /// The tunnel's outbound queue.
    pub out: mpsc::Sender<String>,
    /// Cancelled when the tunnel ends: close the local socket with 1001.
    pub cancel: CancellationToken,
}

type LocalSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs one WebSocket channel: opens `url` on the local service and carries frames both
/// ways until either side closes or the tunnel ends. A socket that cannot be opened is
/// reported with `ws:close` 1011.
///
/// # Cancel safety
/// Not cancel safe (it would drop the local socket without a Close frame); end it through
/// `io.cancel`.
pub async fn run_channel(url: String, mut io: ChannelIo) {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_CHANNEL_MESSAGE);
    config.max_frame_size = Some(MAX_CHANNEL_MESSAGE);
    let connect = timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
    );
    let socket = tokio::select! {
        result = connect => match result {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(err)) => {
                debug!(channel = %io.id, %url, error = %err, "cannot open the local WebSocket");
                close_relay_side(&io, Some(close_code::INTERNAL)).await;
                return;
            }
            Err(_) => {
                debug!(channel = %io.id, %url, "local WebSocket did not open in time");
                close_relay_side(&io, Some(close_code::INTERNAL)).await;
                return;
            }
        },
        () = io.cancel.cancelled() => return,
        _ = &mut io.kill => return,
    };
    carry(socket, &mut io).await;
}

/// Carries frames between the local socket and the tunnel until one side ends.
async fn carry(socket: LocalSocket, io: &mut ChannelIo) {
    let (mut local_tx, mut local_rx) = socket.split();
    // The kill signal only counts when it was sent: its sender is also dropped, without a
    // word, when the tunnel forgets a channel after queueing its Close(code), and that
    // must not race the queued code into a 1001.
    let mut kill_armed = true;
    let close_local = loop {
        tokio::select! {
            // Queued commands first: a Close(code) queued before a kill wins.
            biased;
            command = io.commands.recv() => match command {
                Some(ChannelCommand::Frame(frame)) => {
                    let message = match frame {
                        Frame::Text(text) => Message::Text(text.into()),
                        Frame::Binary(bytes) => Message::Binary(bytes.into()),
                    };
                    if let Err(err) = local_tx.send(message).await {
                        debug!(channel = %io.id, error = %err, "local WebSocket write failed");
                        close_relay_side(io, Some(close_code::INTERNAL)).await;
                        return;
                    }
                }
                // The client closed; the relay has forgotten the channel already.
                Some(ChannelCommand::Close(code)) => break code,
                // The tunnel dropped the channel (it is ending).
                None => break Some(close_code::GOING_AWAY),
            },
            message = local_rx.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Err(code) = forward(io, Frame::Text(text.as_str().to_owned())).await {
                        break Some(code);
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if let Err(code) = forward(io, Frame::Binary(bytes.to_vec())).await {
                        break Some(code);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).filter(|c| close_code::is_sendable(*c));
                    close_relay_side(io, code).await;
                    // The socket answers the Close on the next flush.
                    let _ = timeout(CLOSE_GRACE, local_tx.close()).await;
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(tungstenite::Error::Capacity(_))) => {
                    close_relay_side(io, Some(close_code::TOO_BIG)).await;
                    break Some(close_code::TOO_BIG);
                }
                Some(Err(_)) | None => {
                    close_relay_side(io, Some(close_code::INTERNAL)).await;
                    return;
                }
            },
            code = &mut io.kill, if kill_armed => match code {
                Ok(code) => break Some(code),
                Err(_) => kill_armed = false,
            },
            () = io.cancel.cancelled() => break Some(close_code::GOING_AWAY),
        }
    };
    // We close: send our Close and wait (bounded) for the local side's.
    let frame = close_local
        .filter(|c| close_code::is_sendable(*c))
        .map(|code| CloseFrame {
            code: code.into(),
            reason: "".into(),
        });
    let _ = timeout(CLOSE_GRACE, async {
        if local_tx.send(Message::Close(frame)).await.is_ok() {
            while let Some(Ok(message)) = local_rx.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}

/// Sends one local frame to the client. `Err(code)` when the channel is over and the local
/// socket is to be closed with `code`: the frame was too large for a relay frame (the
/// relay side is closed with 1009 first), or the tunnel is gone.
async fn forward(io: &ChannelIo, frame: Frame) -> Result<(), u16> {
    let text = ToRelay::frame_json(&io.id, &frame);
    if text.len() > MAX_TUNNEL_MESSAGE {
        debug!(channel = %io.id, bytes = text.len(), "local frame too large for the tunnel");
        close_relay_side(io, Some(close_code::TOO_BIG)).await;
        return Err(close_code::TOO_BIG);
    }
    // Waits while the tunnel's queue is full: backpressure onto the local socket.
    io.out.send(text).await.map_err(|_| close_code::GOING_AWAY)
}

/// Tells the relay the local side of the channel closed.
async fn close_relay_side(io: &ChannelIo, code: Option<u16>) {
    let text = ToRelay::WsClose { id: &io.id, code }.to_json();
    let _ = io.out.send(text).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn upstream() -> UpstreamUrl {
        UpstreamUrl::parse("http://127.0.0.1:9").unwrap()
    }

    #[test]
    fn request_headers_drop_hop_by_hop_host_and_length() {
        let request = Request {
            method: "POST".into(),
            path: "/x?y=1".into(),
            headers: Headers(vec![
                ("host".into(), "client.example".into()),
                ("connection".into(), "close".into()),
                ("content-length".into(), "3".into()),
                ("x-forwarded-for".into(), "1.2.3.4".into()),
                ("bad name".into(), "v".into()),
                ("accept".into(), "a".into()),
                ("accept".into(), "b".into()),
            ]),
            body: b"abc".to_vec(),
        };
        let built = build_request(&upstream(), request).unwrap();
        assert_eq!(built.uri(), "http://127.0.0.1:9/x?y=1");
        assert_eq!(built.method(), "POST");
        let names: Vec<_> = built.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-forwarded-for", "accept"]);
        assert_eq!(built.headers().get_all("accept").iter().count(), 2);
        assert!(
            build_request(
                &upstream(),
                Request {
                    method: "GE T".into(),
                    path: "/".into(),
                    headers: Headers::default(),
                    body: vec![]
                }
            )
            .is_err()
        );
    }

    #[test]
    fn response_headers_join_repeats_but_keep_cookies_apart() {
        let mut map = HeaderMap::new();
        map.append("vary", "accept".parse().unwrap());
        map.append("vary", "origin".parse().unwrap());
        map.append("set-cookie", "a=1".parse().unwrap());
        map.append("set-cookie", "b=2; Path=/".parse().unwrap());
        map.append("content-length", "5".parse().unwrap());
        map.append("transfer-encoding", "chunked".parse().unwrap());
        let headers = response_headers(&map);
        assert_eq!(
            headers,
            ResponseHeaders(vec![
                ("vary".into(), HeaderValue::One("accept, origin".into())),
                (
                    "set-cookie".into(),
                    HeaderValue::Many(vec!["a=1".into(), "b=2; Path=/".into()])
                ),
            ])
        );
    }

    #[test]
    fn bodies_are_text_or_base64() {
        let mut response = text_response(200, "hello");
        let v: Value = serde_json::from_str(&response_json("1", &response)).unwrap();
        assert_eq!(v["body"], "hello\n");
        assert!(v.get("encoding").is_none());

        response.body = Bytes::from_static(&[0xff, 0x00, 0x01]);
        let v: Value = serde_json::from_str(&response_json("1", &response)).unwrap();
        assert_eq!(v["body"], "/wAB");
        assert_eq!(v["encoding"], "base64");

        response.body = Bytes::new();
        let v: Value = serde_json::from_str(&response_json("1", &response)).unwrap();
        assert!(v.get("body").is_none());

        // What the agent sends, the relay's parser understands (including base64).
        response.body = Bytes::from_static(&[0xff]);
        let parsed = crate::protocol::parse_host_message(&response_json("9", &response));
        assert!(matches!(
            parsed,
            crate::protocol::Inbound::Message(crate::protocol::HostMessage::HttpResponse {
                status: 200, ref body, ..
            }) if body == &[0xff]
        ));
    }

    #[test]
    fn a_response_too_large_for_a_frame_becomes_502() {
        // Control characters are escaped as \u00XX: six bytes of JSON per body byte.
        let response = Response {
            status: 200,
            headers: ResponseHeaders::default(),
            body: Bytes::from(vec![1u8; MAX_TUNNEL_MESSAGE / 4]),
        };
        let v: Value = serde_json::from_str(&response_json("1", &response)).unwrap();
        assert_eq!(v["status"], 502);
        assert_eq!(v["id"], "1");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_502_not_an_error() {
        // A port that was just free: the connection is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let up = Upstream::new(UpstreamUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap());
        let response = up
            .exchange(Request {
                method: "GET".into(),
                path: "/".into(),
                headers: Headers::default(),
                body: vec![],
            })
            .await;
        assert_eq!(response.status, 502);
        let v: Value = serde_json::from_str(&response_json("4", &response)).unwrap();
        assert_eq!(v["type"], json!("http:response"));
        assert_eq!(v["body"], "upstream unavailable\n");
    }
}
