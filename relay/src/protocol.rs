//! The v1 wire protocol spoken on a tunnel (see `docs/protocol.md`).
//!
//! Every v1 message is one WebSocket text frame holding one JSON object with a `type`
//! field. [`RelayMessage`] is what the relay sends; [`HostMessage`] is what it accepts.
//! Inbound messages are parsed leniently, as the contract demands: unknown fields and
//! unknown `type`s are ignored, and a frame that cannot be understood is reported as
//! [`Inbound::Malformed`] so the tunnel can count it and carry on.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// WebSocket close codes the relay sends. Each one is documented in `docs/protocol.md`.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Tunnel: ping timeout (missed pongs). Client channel: its tunnel went away.
    pub const GOING_AWAY: u16 = 1001;
    /// Missing or invalid hostId or token, or the token does not allow this host.
    pub const POLICY: u16 = 1008;
    /// A message larger than the configured frame limit.
    pub const TOO_BIG: u16 = 1009;
    /// The relay could not complete registration, or failed internally.
    pub const INTERNAL: u16 = 1011;
    /// Client channel: the client read too slowly and its buffer overflowed.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Tunnel: the relay is draining for a deploy; reconnect at once.
    pub const DRAINING: u16 = 4001;
    /// Tunnel: a newer tunnel registered the same hostId and replaced this one.
    pub const REPLACED: u16 = 4002;

    /// Whether `code` may be put in a Close frame on the wire (RFC 6455 §7.4).
    /// 1005, 1006 and 1015 are reserved for reporting and must never be sent.
    pub fn is_sendable(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// The reason sent in every `drain` message.
pub const DRAIN_REASON: &str = "relay shutting down";

/// Identifies one stream (an HTTP exchange or a WebSocket channel) within a tunnel.
///
/// On the wire a v1 `id` is a string; the relay issues decimal numbers, unique for the
/// life of the tunnel, and treats any id it did not issue as unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl StreamId {
    /// Parses an id received from a host; `None` for anything the relay cannot have issued.
    pub fn parse(s: &str) -> Option<StreamId> {
        s.parse().ok().map(StreamId)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for StreamId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// How a `data` or `body` string is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Standard base64 (RFC 4648, with padding): the payload is binary.
    Base64,
}

/// HTTP headers as v1 carries them: a JSON object from lowercase name to value.
///
/// Order is kept. Outbound, the relay joins repeated request headers before building
/// this. Inbound, a value may also be an array of strings (each becomes its own header
/// line, which is how `set-cookie` survives) or a number or boolean; other values are
/// dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// v1 headers from an HTTP header map: the values of a repeated name are joined into
    /// one (`, `, or `; ` for `cookie`, RFC 9110 §5.3 and RFC 6265 §5.4); values that are
    /// not text are dropped, as a JSON string cannot carry them.
    pub fn from_map(map: &http::HeaderMap) -> Headers {
        let mut out = Vec::with_capacity(map.keys_len());
        for name in map.keys() {
            let values: Vec<&str> = map
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() {
                continue;
            }
            let separator = if name == http::header::COOKIE {
                "; "
            } else {
                ", "
            };
            out.push((name.as_str().to_owned(), values.join(separator)));
        }
        Headers(out)
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;

        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = Headers;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of header names to values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(name) = map.next_key::<String>()? {
                    let HeaderValues(values) = map.next_value()?;
                    for value in values {
                        out.push((name.clone(), value));
                    }
                }
                Ok(Headers(out))
            }
        }

        deserializer.deserialize_map(HeadersVisitor)
    }
}

/// The values of one header name in an inbound `headers` object.
struct HeaderValues(Vec<String>);

impl<'de> Deserialize<'de> for HeaderValues {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValuesVisitor;

        impl<'de> Visitor<'de> for ValuesVisitor {
            type Value = HeaderValues;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v.to_owned()]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v.to_string()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v.to_string()]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v.to_string()]))
            }
            fn visit_unit<E: de::Error>(self) -> Result<HeaderValues, E> {
                Ok(HeaderValues(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HeaderValues, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<serde_json::Value>()? {
                    if let serde_json::Value::String(s) = v {
                        out.push(s);
                    }
                }
                Ok(HeaderValues(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderValues, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(HeaderValues(Vec::new()))
            }
        }

        deserializer.deserialize_any(ValuesVisitor)
    }
}

/// A message from the relay to a host.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum RelayMessage<'a> {
    /// One HTTP exchange; the host answers with `http:response` and the same id.
    #[serde(rename = "http")]
    Http {
        /// The exchange.
        id: StreamId,
        /// HTTP method, upper case as the client sent it.
        method: &'a str,
        /// Host-local path plus `?query`.
        path: &'a str,
        /// Request headers, hop-by-hop and credentials removed.
        headers: &'a Headers,
        /// Request body as text; absent when empty.
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a str>,
    },
    /// A client opened a WebSocket.
    #[serde(rename = "ws:open")]
    WsOpen {
        /// The channel.
        id: StreamId,
        /// Host-local path.
        path: &'a str,
        /// Query string without the leading `?`; absent when empty.
        #[serde(skip_serializing_if = "Option::is_none")]
        query: Option<&'a str>,
    },
    /// One client frame.
    #[serde(rename = "ws:frame")]
    WsFrame {
        /// The channel.
        id: StreamId,
        /// The text, or the base64 of a binary frame.
        data: &'a str,
        /// `base64` for a binary frame.
        #[serde(skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
    },
    /// The client side of a channel closed.
    #[serde(rename = "ws:close")]
    WsClose {
        /// The channel.
        id: StreamId,
        /// The client's close code, when it sent one.
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Liveness probe.
    #[serde(rename = "ping")]
    Ping,
    /// The relay is shutting down: reconnect now.
    #[serde(rename = "drain")]
    Drain {
        /// Why, for the host's logs.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
}

impl RelayMessage<'_> {
    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every key is a string and every value is
        // a string, number or flat map of strings.
        serde_json::to_string(self).expect("relay messages always serialize")
    }
}

/// A message from a host, as understood by the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum HostMessage {
    /// The answer to an `http` exchange.
    HttpResponse {
        /// The exchange, as a string the host sent back.
        id: String,
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: Headers,
        /// Response body, already decoded from base64 when the host said so.
        body: Vec<u8>,
    },
    /// A frame for the client of a channel.
    WsFrame {
        /// The channel.
        id: String,
        /// The payload.
        data: Frame,
    },
    /// The host-local socket of a channel closed.
    WsClose {
        /// The channel.
        id: String,
        /// The code to close the client with.
        code: Option<u16>,
    },
    /// Answer to `ping`.
    Pong,
}

/// One WebSocket data frame carried over a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

/// The result of reading one text frame from a host.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A message the relay acts on.
    Message(HostMessage),
    /// Valid JSON with a `type` the relay does not know: ignored (forward compatibility).
    UnknownType,
    /// Not something the relay can act on. `id` is set when the frame still named a
    /// stream, so that stream can be failed at once instead of timing out.
    Malformed {
        /// What was wrong, for the debug log.
        reason: Cow<'static, str>,
        /// The stream the frame named, if any.
        id: Option<String>,
    },
}

/// Every field any v1 host message may carry, parsed in one pass; validation happens
/// after, per type, so one bad field never hides which stream the frame was about.
#[derive(Deserialize)]
struct RawHostMessage {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    status: Option<u16>,
    #[serde(default)]
    headers: Headers,
    body: Option<String>,
    data: Option<String>,
    encoding: Option<String>,
    code: Option<u16>,
}

/// Parses one text frame from a host.
///
/// ```
/// use relay::protocol::{parse_host_message, HostMessage, Inbound};
/// assert_eq!(parse_host_message(r#"{"type":"pong"}"#), Inbound::Message(HostMessage::Pong));
/// assert_eq!(parse_host_message(r#"{"type":"later:thing"}"#), Inbound::UnknownType);
/// assert!(matches!(parse_host_message("{not json"), Inbound::Malformed { .. }));
/// ```
pub fn parse_host_message(text: &str) -> Inbound {
    let raw: RawHostMessage = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            return Inbound::Malformed {
                reason: format!("invalid JSON: {err}").into(),
                id: None,
            };
        }
    };
    let Some(kind) = raw.kind else {
        return malformed("no type field", raw.id);
    };
    let message = match kind.as_str() {
        "pong" => HostMessage::Pong,
        "http:response" => {
            let Some(id) = raw.id else {
                return malformed("http:response without id", None);
            };
            let Some(status) = raw.status else {
                return malformed("http:response without status", Some(id));
            };
            let body = match decode(raw.body, raw.encoding.as_deref()) {
                Ok(Frame::Text(s)) => s.into_bytes(),
                Ok(Frame::Binary(b)) => b,
                Err(reason) => return malformed(reason, Some(id)),
            };
            HostMessage::HttpResponse {
                id,
                status,
                headers: raw.headers,
                body,
            }
        }
        "ws:frame" => {
            let Some(id) = raw.id else {
                return malformed("ws:frame without id", None);
            };
            if raw.data.is_none() {
                return malformed("ws:frame without data", Some(id));
            }
            match decode(raw.data, raw.encoding.as_deref()) {
                Ok(data) => HostMessage::WsFrame { id, data },
                Err(reason) => return malformed(reason, Some(id)),
            }
        }
        "ws:close" => {
            let Some(id) = raw.id else {
                return malformed("ws:close without id", None);
            };
            HostMessage::WsClose { id, code: raw.code }
        }
        _ => return Inbound::UnknownType,
    };
    Inbound::Message(message)
}

fn malformed(reason: &'static str, id: Option<String>) -> Inbound {
    Inbound::Malformed {
        reason: reason.into(),
        id,
    }
}

/// Decodes a `data`/`body` string according to its `encoding`.
fn decode(data: Option<String>, encoding: Option<&str>) -> Result<Frame, &'static str> {
    use base64::Engine as _;
    let data = data.unwrap_or_default();
    match encoding {
        None => Ok(Frame::Text(data)),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .map(Frame::Binary)
            .map_err(|_| "invalid base64 payload"),
        Some(_) => Err("unknown encoding"),
    }
}

/// Encodes binary data for a v1 `ws:frame`.
pub fn encode_base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn http_message_serializes_as_v1_with_string_id() {
        let headers = Headers(vec![("accept".into(), "text/plain".into())]);
        let msg = RelayMessage::Http {
            id: StreamId(7),
            method: "POST",
            path: "/a?b=1",
            headers: &headers,
            body: Some("hi"),
        };
        let v: Value = serde_json::from_str(&msg.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type":"http","id":"7","method":"POST","path":"/a?b=1",
                   "headers":{"accept":"text/plain"},"body":"hi"})
        );
    }

    #[test]
    fn empty_optional_fields_are_omitted() {
        let v: Value = serde_json::from_str(
            &RelayMessage::WsOpen {
                id: StreamId(1),
                path: "/ws",
                query: None,
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(v, json!({"type":"ws:open","id":"1","path":"/ws"}));
        let v: Value = serde_json::from_str(&RelayMessage::Ping.to_json()).unwrap();
        assert_eq!(v, json!({"type":"ping"}));
    }

    #[test]
    fn http_response_with_header_arrays_and_numbers_is_accepted() {
        let text = json!({"type":"http:response","id":"3","status":201,
            "headers":{"set-cookie":["a=1","b=2"],"content-length":5,"x":"y"},
            "body":"hello","extra":"ignored"})
        .to_string();
        let Inbound::Message(HostMessage::HttpResponse {
            id,
            status,
            headers,
            body,
        }) = parse_host_message(&text)
        else {
            panic!("not a response");
        };
        assert_eq!(
            (id.as_str(), status, body.as_slice()),
            ("3", 201, &b"hello"[..])
        );
        let names: Vec<_> = headers.0.iter().map(|(n, v)| format!("{n}={v}")).collect();
        assert!(names.contains(&"set-cookie=a=1".to_string()));
        assert!(names.contains(&"set-cookie=b=2".to_string()));
        assert!(names.contains(&"content-length=5".to_string()));
    }

    #[test]
    fn binary_ws_frame_is_decoded_from_base64() {
        let text = json!({"type":"ws:frame","id":"9","data":"AAEC","encoding":"base64"});
        assert_eq!(
            parse_host_message(&text.to_string()),
            Inbound::Message(HostMessage::WsFrame {
                id: "9".into(),
                data: Frame::Binary(vec![0, 1, 2])
            })
        );
    }

    #[test]
    fn a_bad_frame_still_names_its_stream() {
        let text = json!({"type":"http:response","id":"4","body":"x"}).to_string();
        assert!(matches!(
            parse_host_message(&text),
            Inbound::Malformed { id: Some(id), .. } if id == "4"
        ));
        let text = json!({"type":"ws:frame","id":"5","data":"!!","encoding":"base64"});
        assert!(matches!(
            parse_host_message(&text.to_string()),
            Inbound::Malformed { id: Some(id), .. } if id == "5"
        ));
    }

    #[test]
    fn non_object_and_typeless_frames_are_malformed() {
        for text in ["[]", "42", "\"pong\"", "{}", r#"{"type":7}"#] {
            assert!(
                matches!(parse_host_message(text), Inbound::Malformed { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn only_wire_legal_close_codes_are_sendable() {
        for code in [1000, 1001, 1008, 1011, 3000, 4001, 4999] {
            assert!(close_code::is_sendable(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert!(!close_code::is_sendable(code), "{code}");
        }
    }
}
