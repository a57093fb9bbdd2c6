//! An `h2` agent that speaks HTTP/2 by hand, frame by frame: for hostile agents that
//! break the protocol, abuse its windows or stop reading, which no well-behaved HTTP/2
//! library can be made to do.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Frame types and flags used here (RFC 9113, section 6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// A tunnel WebSocket as the raw agent holds it.
pub type RawTunnel =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// SETTINGS and a connection WINDOW_UPDATE that let the relay send 2 GiB on every
/// stream and on the connection before waiting for the agent.
pub fn huge_windows() -> Vec<u8> {
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 2^31 - 1.
    let mut out = frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
    out.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    ));
    out
}

/// Opens a tunnel to the relay at `tunnel_url` (`ws://…/tunnel?hostId=…`) with `token`,
/// asking for h2, and does the agent's side of the HTTP/2 handshake (its SETTINGS and
/// the ACK of the relay's).
///
/// # Panics
/// If the tunnel does not open or the relay does not grant h2.
pub async fn agent(tunnel_url: &str, token: &str) -> RawTunnel {
    let mut request = tunnel_url.into_client_request().expect("tunnel url");
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is a header value"),
    );
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("relay-h2"),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the tunnel opens");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "relay-h2",
        "the relay grants h2"
    );
    let mut hello = frame(SETTINGS, 0, 0, &[]);
    hello.extend(frame(SETTINGS, ACK, 0, &[]));
    ws.send(Message::Binary(hello.into()))
        .await
        .expect("the handshake goes out");
    ws
}
