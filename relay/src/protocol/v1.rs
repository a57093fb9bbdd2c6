//! The v1 codec: the JSON messages of a v1 tunnel, both ways, for the relay and the agent
//! alike (see `docs/protocol.md` and the compatibility contract it follows).
//!
//! Every v1 message is one WebSocket text frame holding one JSON object with a `type`
//! field. [`RelayMessage`] is what a relay sends and a host reads; [`HostMessage`] is what
//! a host sends and a relay reads. Each encodes with `to_json` and decodes with `parse`,
//! so what one side writes the other reads by construction. Decoding is lenient, as the
//! contract demands: unknown fields and unknown `type`s are ignored, and a frame that
//! cannot be understood is reported as [`Decoded::Malformed`] (naming the stream when it
//! still can) so the tunnel counts it and carries on.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Frame, close_code};

/// HTTP headers as v1 carries them: a JSON object from lowercase name to value.
///
/// Order is kept, and a name may repeat. On the wire a repeated name becomes an array of
/// strings (each its own header line: how `set-cookie` survives); the relay joins
/// repeated request headers into one value before building its messages
/// ([`Headers::from_map`]), as the contract has string values there. Inbound, a value may
/// also be a number or boolean; other values are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// Headers for a relay → host message: the values of a repeated name are joined into
    /// one (`, `, or `; ` for `cookie`, RFC 9110 §5.3 and RFC 6265 §5.4); values that
    /// are not text are dropped, as a JSON string cannot carry them.
    pub fn from_map(map: &http::HeaderMap) -> Headers {
        Headers::collect(map, |_| false)
    }

    /// Headers for a host → relay answer: as [`Headers::from_map`], except that
    /// `set-cookie` values, which cannot be joined, stay separate lines (an array on the
    /// wire).
    pub fn from_response_map(map: &http::HeaderMap) -> Headers {
        Headers::collect(map, |name| name == http::header::SET_COOKIE)
    }

    fn collect(map: &http::HeaderMap, keep_apart: impl Fn(&http::HeaderName) -> bool) -> Headers {
        let mut out = Vec::with_capacity(map.keys_len());
        for name in map.keys() {
            let values = map.get_all(name).iter().filter_map(|v| v.to_str().ok());
            if keep_apart(name) {
                out.extend(values.map(|v| (name.as_str().to_owned(), v.to_owned())));
                continue;
            }
            let values: Vec<&str> = values.collect();
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

    /// An HTTP header map of these headers; names or values HTTP cannot carry are
    /// skipped and counted in the returned number.
    pub fn to_map(&self) -> (http::HeaderMap, usize) {
        let mut map = http::HeaderMap::with_capacity(self.0.len());
        let mut skipped = 0;
        for (name, value) in &self.0 {
            match (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => skipped += 1,
            }
        }
        (map, skipped)
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Group repeated names, keeping the order of first appearance. Header lists are
        // short; a quadratic scan beats building a map.
        let mut map = serializer.serialize_map(None)?;
        for (i, (name, value)) in self.0.iter().enumerate() {
            if self.0[..i].iter().any(|(n, _)| n == name) {
                continue;
            }
            let rest: Vec<&str> = self.0[i + 1..]
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            if rest.is_empty() {
                map.serialize_entry(name, value)?;
            } else {
                let mut all = Vec::with_capacity(rest.len() + 1);
                all.push(value.as_str());
                all.extend(rest);
                map.serialize_entry(name, &all)?;
            }
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

/// A body or frame as it travels: text as-is, binary as base64 with `encoding: base64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload<'a> {
    /// UTF-8 text.
    Text(Cow<'a, str>),
    /// Anything else.
    Binary(Cow<'a, [u8]>),
}

impl Payload<'_> {
    /// Whether there is nothing to carry (an absent `body`).
    pub fn is_empty(&self) -> bool {
        match self {
            Payload::Text(text) => text.is_empty(),
            Payload::Binary(bytes) => bytes.is_empty(),
        }
    }

    /// The bytes carried.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Payload::Text(text) => text.into_owned().into_bytes(),
            Payload::Binary(bytes) => bytes.into_owned(),
        }
    }

    /// A body of `bytes`: text when they are UTF-8, binary otherwise.
    pub fn of_bytes(bytes: &[u8]) -> Payload<'_> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Payload::Text(Cow::Borrowed(text)),
            Err(_) => Payload::Binary(Cow::Borrowed(bytes)),
        }
    }

    /// The wire string and its `encoding`.
    fn encoded(&self) -> (Cow<'_, str>, Option<&'static str>) {
        use base64::Engine as _;
        match self {
            Payload::Text(text) => (Cow::Borrowed(text), None),
            Payload::Binary(bytes) => (
                Cow::Owned(base64::engine::general_purpose::STANDARD.encode(bytes)),
                Some("base64"),
            ),
        }
    }

    /// Decodes a wire string according to its `encoding`.
    fn decode(data: String, encoding: Option<&str>) -> Result<Payload<'static>, &'static str> {
        use base64::Engine as _;
        match encoding {
            None => Ok(Payload::Text(Cow::Owned(data))),
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map(|bytes| Payload::Binary(Cow::Owned(bytes)))
                .map_err(|_| "invalid base64 payload"),
            Some(_) => Err("unknown encoding"),
        }
    }
}

impl<'a> From<&'a Frame> for Payload<'a> {
    fn from(frame: &'a Frame) -> Payload<'a> {
        match frame {
            Frame::Text(text) => Payload::Text(Cow::Borrowed(text)),
            Frame::Binary(bytes) => Payload::Binary(Cow::Borrowed(&bytes[..])),
        }
    }
}

impl From<Payload<'_>> for Frame {
    fn from(payload: Payload<'_>) -> Frame {
        match payload {
            Payload::Text(text) => Frame::Text(text.into_owned()),
            Payload::Binary(bytes) => Frame::Binary(bytes.into_owned().into()),
        }
    }
}

/// A message from a relay to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMessage<'a> {
    /// One HTTP exchange; the host answers with `http:response` and the same id.
    Http {
        /// The exchange.
        id: Cow<'a, str>,
        /// HTTP method, upper case as the client sent it.
        method: Cow<'a, str>,
        /// Host-local path plus `?query`.
        path: Cow<'a, str>,
        /// Request headers, hop-by-hop and credentials removed.
        headers: Cow<'a, Headers>,
        /// Request body; absent on the wire when empty. The relay only sends text (the
        /// contract has a string body); a binary body is base64 with `encoding`.
        body: Payload<'a>,
    },
    /// A client opened a WebSocket: the host opens the matching local one.
    WsOpen {
        /// The channel.
        id: Cow<'a, str>,
        /// Host-local path.
        path: Cow<'a, str>,
        /// Query string without the leading `?`; absent when empty.
        query: Option<Cow<'a, str>>,
    },
    /// One client frame.
    WsFrame {
        /// The channel.
        id: Cow<'a, str>,
        /// The frame.
        data: Payload<'a>,
    },
    /// The client side of a channel closed.
    WsClose {
        /// The channel.
        id: Cow<'a, str>,
        /// The client's close code, when it sent one.
        code: Option<u16>,
    },
    /// Liveness probe: the host answers `pong`.
    Ping,
    /// The relay is shutting down: reconnect now, elsewhere.
    Drain {
        /// Why, for the host's logs.
        reason: Option<Cow<'a, str>>,
    },
}

/// A message from a host to a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMessage<'a> {
    /// The answer to an `http` exchange.
    HttpResponse {
        /// The exchange, as the relay named it.
        id: Cow<'a, str>,
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: Cow<'a, Headers>,
        /// Response body; absent on the wire when empty.
        body: Payload<'a>,
    },
    /// A frame for the client of a channel.
    WsFrame {
        /// The channel.
        id: Cow<'a, str>,
        /// The frame.
        data: Payload<'a>,
    },
    /// The host-local socket of a channel closed (or could not be opened: 1011).
    WsClose {
        /// The channel.
        id: Cow<'a, str>,
        /// The code to close the client with.
        code: Option<u16>,
    },
    /// Answer to `ping`.
    Pong,
}

/// The result of reading one text frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A message to act on.
    Message(T),
    /// Valid JSON with a `type` this side does not know: ignored (forward compatibility).
    UnknownType(String),
    /// Not something to act on. `id` is set when the frame still named a stream, so that
    /// stream can be failed at once instead of timing out.
    Malformed {
        /// What was wrong, for the debug log.
        reason: Cow<'static, str>,
        /// The stream the frame named, if any.
        id: Option<String>,
    },
}

/// Every field a v1 message may carry, as it is written: one shape for both directions,
/// fields absent when `None`.
#[derive(Serialize)]
struct WireOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<&'a Headers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl WireOut<'_> {
    fn of(kind: &'static str) -> WireOut<'static> {
        WireOut {
            kind,
            id: None,
            method: None,
            path: None,
            query: None,
            status: None,
            headers: None,
            body: None,
            data: None,
            encoding: None,
            code: None,
            reason: None,
        }
    }

    fn to_json(&self) -> String {
        // Cannot fail: every key is a string and every value a string, number or a flat
        // map of strings and arrays of strings.
        serde_json::to_string(self).expect("v1 messages always serialize")
    }
}

/// Every field a v1 message may carry, as it is read; validated per type afterwards, so
/// one bad field never hides which stream the frame was about.
#[derive(Deserialize)]
struct WireIn {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    method: Option<String>,
    path: Option<String>,
    query: Option<String>,
    status: Option<u16>,
    #[serde(default)]
    headers: Headers,
    body: Option<String>,
    data: Option<String>,
    encoding: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
}

impl WireIn {
    /// Reads one frame, or says why it is not a message at all.
    fn parse<T>(text: &str) -> Result<(WireIn, String), Decoded<T>> {
        let mut wire: WireIn = serde_json::from_str(text).map_err(|err| Decoded::Malformed {
            reason: format!("invalid JSON: {err}").into(),
            id: stream_named_in(text),
        })?;
        match wire.kind.take() {
            Some(kind) => Ok((wire, kind)),
            None => Err(malformed("no type field", wire.id)),
        }
    }

    fn need(field: Option<String>, what: &'static str) -> Result<String, Reject> {
        field.ok_or(Reject::Malformed(what))
    }

    /// The id and frame of a `ws:frame`, either way.
    fn frame(self) -> Result<(Cow<'static, str>, Payload<'static>), Reject> {
        let id = WireIn::need(self.id, "ws:frame without id")?;
        let data = WireIn::need(self.data, "ws:frame without data")?;
        let data = Payload::decode(data, self.encoding.as_deref()).map_err(Reject::Malformed)?;
        Ok((Cow::Owned(id), data))
    }

    /// The id and code of a `ws:close`, either way.
    fn close(self) -> Result<(Cow<'static, str>, Option<u16>), Reject> {
        let id = WireIn::need(self.id, "ws:close without id")?;
        Ok((Cow::Owned(id), self.code))
    }
}

/// Why a frame that parsed as JSON is not a message, before the stream it named is
/// attached ([`Reject::into_decoded`]).
enum Reject {
    Malformed(&'static str),
    UnknownType,
}

impl Reject {
    fn into_decoded<T>(self, kind: String, id: Option<String>) -> Decoded<T> {
        match self {
            Reject::Malformed(reason) => malformed(reason, id),
            Reject::UnknownType => Decoded::UnknownType(kind),
        }
    }
}

/// The stream a frame that does not parse as a message still names (`"id"`, a string or
/// a number), so that its exchange or channel fails now instead of at a timeout. `None`
/// when the text is not a JSON object or names none.
fn stream_named_in(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        id: Option<serde_json::Value>,
    }
    match serde_json::from_str::<Named>(text).ok()?.id? {
        serde_json::Value::String(id) => Some(id),
        serde_json::Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

fn malformed<T>(reason: &'static str, id: Option<String>) -> Decoded<T> {
    Decoded::Malformed {
        reason: reason.into(),
        id,
    }
}

/// Sets `body`/`data` and `encoding` for a payload; an empty body is left out.
fn put_payload<'a>(out: &mut WireOut<'a>, payload: &'a Payload<'a>, as_body: bool) {
    if as_body && payload.is_empty() {
        return;
    }
    let (text, encoding) = payload.encoded();
    out.encoding = encoding;
    if as_body {
        out.body = Some(text);
    } else {
        out.data = Some(text);
    }
}

// === impl RelayMessage ===

impl RelayMessage<'_> {
    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        match self {
            RelayMessage::Http {
                id,
                method,
                path,
                headers,
                body,
            } => {
                let mut out = WireOut::of("http");
                out.id = Some(id);
                out.method = Some(method);
                out.path = Some(path);
                out.headers = Some(headers);
                put_payload(&mut out, body, true);
                out.to_json()
            }
            RelayMessage::WsOpen { id, path, query } => {
                let mut out = WireOut::of("ws:open");
                out.id = Some(id);
                out.path = Some(path);
                out.query = query.as_deref();
                out.to_json()
            }
            RelayMessage::WsFrame { id, data } => {
                let mut out = WireOut::of("ws:frame");
                out.id = Some(id);
                put_payload(&mut out, data, false);
                out.to_json()
            }
            RelayMessage::WsClose { id, code } => {
                let mut out = WireOut::of("ws:close");
                out.id = Some(id);
                // Hosts close their local socket with this code, and most cannot use
                // any but 1000 and 3000–4999 (docs/protocol.md, "Close codes a host
                // gets"): the rest become 1000, the original named in `reason`.
                let reason;
                match *code {
                    Some(code) if !close_code::is_for_application(code) => {
                        reason = format!("{} ({code})", close_code::meaning(code));
                        out.code = Some(close_code::NORMAL);
                        out.reason = Some(&reason);
                    }
                    code => out.code = code,
                }
                out.to_json()
            }
            RelayMessage::Ping => WireOut::of("ping").to_json(),
            RelayMessage::Drain { reason } => {
                let mut out = WireOut::of("drain");
                out.reason = reason.as_deref();
                out.to_json()
            }
        }
    }

    /// Reads one text frame from a relay.
    ///
    /// ```
    /// use relay::protocol::v1::{Decoded, RelayMessage};
    /// assert_eq!(RelayMessage::parse(r#"{"type":"ping"}"#), Decoded::Message(RelayMessage::Ping));
    /// assert!(matches!(RelayMessage::parse(r#"{"type":"later"}"#), Decoded::UnknownType(_)));
    /// ```
    pub fn parse(text: &str) -> Decoded<RelayMessage<'static>> {
        let (wire, kind) = match WireIn::parse(text) {
            Ok(parsed) => parsed,
            Err(decoded) => return decoded,
        };
        let id = wire.id.clone();
        let message = (|| {
            Ok(match kind.as_str() {
                "ping" => RelayMessage::Ping,
                "drain" => RelayMessage::Drain {
                    reason: wire.reason.map(Cow::Owned),
                },
                "http" => RelayMessage::Http {
                    id: Cow::Owned(WireIn::need(wire.id, "http without id")?),
                    method: Cow::Owned(WireIn::need(wire.method, "http without method")?),
                    path: Cow::Owned(WireIn::need(wire.path, "http without path")?),
                    headers: Cow::Owned(wire.headers),
                    body: Payload::decode(wire.body.unwrap_or_default(), wire.encoding.as_deref())
                        .map_err(Reject::Malformed)?,
                },
                "ws:open" => RelayMessage::WsOpen {
                    id: Cow::Owned(WireIn::need(wire.id, "ws:open without id")?),
                    path: Cow::Owned(WireIn::need(wire.path, "ws:open without path")?),
                    query: wire.query.map(Cow::Owned),
                },
                "ws:frame" => {
                    let (id, data) = wire.frame()?;
                    RelayMessage::WsFrame { id, data }
                }
                "ws:close" => {
                    let (id, code) = wire.close()?;
                    RelayMessage::WsClose { id, code }
                }
                _ => return Err(Reject::UnknownType),
            })
        })();
        message.map_or_else(|reject| reject.into_decoded(kind, id), Decoded::Message)
    }
}

// === impl HostMessage ===

impl HostMessage<'_> {
    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        match self {
            HostMessage::HttpResponse {
                id,
                status,
                headers,
                body,
            } => {
                let mut out = WireOut::of("http:response");
                out.id = Some(id);
                out.status = Some(*status);
                out.headers = Some(headers);
                put_payload(&mut out, body, true);
                out.to_json()
            }
            HostMessage::WsFrame { id, data } => {
                let mut out = WireOut::of("ws:frame");
                out.id = Some(id);
                put_payload(&mut out, data, false);
                out.to_json()
            }
            HostMessage::WsClose { id, code } => {
                let mut out = WireOut::of("ws:close");
                out.id = Some(id);
                out.code = *code;
                out.to_json()
            }
            HostMessage::Pong => WireOut::of("pong").to_json(),
        }
    }

    /// Reads one text frame from a host.
    ///
    /// ```
    /// use relay::protocol::v1::{Decoded, HostMessage};
    /// assert_eq!(HostMessage::parse(r#"{"type":"pong"}"#), Decoded::Message(HostMessage::Pong));
    /// assert!(matches!(HostMessage::parse("{not json"), Decoded::Malformed { .. }));
    /// ```
    pub fn parse(text: &str) -> Decoded<HostMessage<'static>> {
        let (wire, kind) = match WireIn::parse(text) {
            Ok(parsed) => parsed,
            Err(decoded) => return decoded,
        };
        let id = wire.id.clone();
        let message = (|| {
            Ok(match kind.as_str() {
                "pong" => HostMessage::Pong,
                "http:response" => {
                    let stream = WireIn::need(wire.id, "http:response without id")?;
                    let status = wire
                        .status
                        .ok_or(Reject::Malformed("http:response without status"))?;
                    HostMessage::HttpResponse {
                        id: Cow::Owned(stream),
                        status,
                        headers: Cow::Owned(wire.headers),
                        body: Payload::decode(
                            wire.body.unwrap_or_default(),
                            wire.encoding.as_deref(),
                        )
                        .map_err(Reject::Malformed)?,
                    }
                }
                "ws:frame" => {
                    let (id, data) = wire.frame()?;
                    HostMessage::WsFrame { id, data }
                }
                "ws:close" => {
                    let (id, code) = wire.close()?;
                    HostMessage::WsClose { id, code }
                }
                _ => return Err(Reject::UnknownType),
            })
        })();
        message.map_or_else(|reject| reject.into_decoded(kind, id), Decoded::Message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn value(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn text(s: &str) -> Payload<'_> {
        Payload::Text(Cow::Borrowed(s))
    }

    #[test]
    fn a_host_is_sent_only_close_codes_an_application_may_close_with() {
        let close = |code| {
            value(
                &RelayMessage::WsClose {
                    id: "4".into(),
                    code,
                }
                .to_json(),
            )
        };
        // What a WHATWG WebSocket.close() takes passes as it is.
        for code in [1000, 3000, 4321, 4999] {
            assert_eq!(
                close(Some(code)),
                json!({"type":"ws:close","id":"4","code":code})
            );
        }
        assert_eq!(close(None), json!({"type":"ws:close","id":"4"}));
        // The rest would make the host's close() throw: 1000, the original in `reason`.
        for (code, reason) in [
            (1001, "going away (1001)"),
            (1005, "no code (1005)"),
            (1006, "closed abnormally (1006)"),
            (1009, "message too big (1009)"),
            (1013, "try again later (1013)"),
            (2999, "closed (2999)"),
        ] {
            assert_eq!(
                close(Some(code)),
                json!({"type":"ws:close","id":"4","code":1000,"reason":reason}),
            );
        }
    }

    #[test]
    fn http_message_serializes_as_v1_with_string_id() {
        let headers = Headers(vec![("accept".into(), "text/plain".into())]);
        let msg = RelayMessage::Http {
            id: "7".into(),
            method: "POST".into(),
            path: "/a?b=1".into(),
            headers: Cow::Borrowed(&headers),
            body: text("hi"),
        };
        assert_eq!(
            value(&msg.to_json()),
            json!({"type":"http","id":"7","method":"POST","path":"/a?b=1",
                   "headers":{"accept":"text/plain"},"body":"hi"})
        );
    }

    #[test]
    fn empty_optional_fields_are_omitted() {
        let open = RelayMessage::WsOpen {
            id: "1".into(),
            path: "/ws".into(),
            query: None,
        };
        assert_eq!(
            value(&open.to_json()),
            json!({"type":"ws:open","id":"1","path":"/ws"})
        );
        assert_eq!(value(&RelayMessage::Ping.to_json()), json!({"type":"ping"}));
        let empty = HostMessage::HttpResponse {
            id: "8".into(),
            status: 204,
            headers: Cow::Owned(Headers::default()),
            body: text(""),
        };
        assert_eq!(
            value(&empty.to_json()),
            json!({"type":"http:response","id":"8","status":204,"headers":{}})
        );
        let close = HostMessage::WsClose {
            id: "3".into(),
            code: None,
        };
        assert_eq!(value(&close.to_json()), json!({"type":"ws:close","id":"3"}));
    }

    #[test]
    fn what_one_side_writes_the_other_reads() {
        let headers = Headers(vec![
            ("content-type".into(), "text/plain".into()),
            ("set-cookie".into(), "a=1".into()),
            ("set-cookie".into(), "b=2; Path=/".into()),
        ]);
        let messages = [
            HostMessage::HttpResponse {
                id: "7".into(),
                status: 200,
                headers: Cow::Borrowed(&headers),
                body: Payload::Binary(Cow::Borrowed(&[0xff, 0, 1])),
            },
            HostMessage::WsFrame {
                id: "5".into(),
                data: text("hé"),
            },
            HostMessage::WsClose {
                id: "5".into(),
                code: Some(1000),
            },
            HostMessage::Pong,
        ];
        for message in messages {
            assert_eq!(
                HostMessage::parse(&message.to_json()),
                Decoded::Message(message)
            );
        }
        let messages = [
            RelayMessage::Http {
                id: "1".into(),
                method: "GET".into(),
                path: "/".into(),
                headers: Cow::Owned(Headers::default()),
                body: text(""),
            },
            RelayMessage::WsOpen {
                id: "2".into(),
                path: "/ws".into(),
                query: Some("a=1".into()),
            },
            RelayMessage::WsFrame {
                id: "2".into(),
                data: Payload::Binary(Cow::Borrowed(&[0, 1, 2])),
            },
            RelayMessage::WsClose {
                id: "2".into(),
                code: None,
            },
            RelayMessage::Ping,
            RelayMessage::Drain {
                reason: Some("deploy".into()),
            },
        ];
        for message in messages {
            assert_eq!(
                RelayMessage::parse(&message.to_json()),
                Decoded::Message(message)
            );
        }
    }

    #[test]
    fn set_cookie_lines_travel_as_an_array() {
        let headers = Headers(vec![
            ("set-cookie".into(), "a=1".into()),
            ("vary".into(), "accept".into()),
            ("set-cookie".into(), "b=2".into()),
        ]);
        let message = HostMessage::HttpResponse {
            id: "1".into(),
            status: 200,
            headers: Cow::Borrowed(&headers),
            body: text("ok"),
        };
        assert_eq!(
            value(&message.to_json())["headers"],
            json!({"set-cookie":["a=1","b=2"],"vary":"accept"})
        );
    }

    #[test]
    fn header_arrays_numbers_and_extra_fields_are_accepted() {
        let text = json!({"type":"http:response","id":"3","status":201,
            "headers":{"set-cookie":["a=1","b=2"],"content-length":5,"x":"y"},
            "body":"hello","extra":"ignored"})
        .to_string();
        let Decoded::Message(HostMessage::HttpResponse {
            id,
            status,
            headers,
            body,
        }) = HostMessage::parse(&text)
        else {
            panic!("not a response");
        };
        assert_eq!((id.as_ref(), status), ("3", 201));
        assert_eq!(body.into_bytes(), b"hello");
        let mut lines: Vec<_> = headers.0.iter().map(|(n, v)| format!("{n}={v}")).collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                "content-length=5",
                "set-cookie=a=1",
                "set-cookie=b=2",
                "x=y"
            ]
        );
    }

    #[test]
    fn a_bad_frame_still_names_its_stream() {
        let text = json!({"type":"http:response","id":"4","body":"x"}).to_string();
        assert!(matches!(
            HostMessage::parse(&text),
            Decoded::Malformed { id: Some(id), .. } if id == "4"
        ));
        let text = json!({"type":"ws:frame","id":"5","data":"!!","encoding":"base64"});
        assert!(matches!(
            HostMessage::parse(&text.to_string()),
            Decoded::Malformed { id: Some(id), .. } if id == "5"
        ));
    }

    #[test]
    fn a_frame_with_a_wrongly_typed_field_still_names_its_stream() {
        for bad in [
            json!({"type":"http:response","id":"6","status":65536,"headers":{}}),
            json!({"type":"http:response","id":"6","status":"200","headers":{}}),
            json!({"type":"http:response","id":"6","status":200.0,"headers":{}}),
            json!({"type":"http:response","id":"6","status":200,"headers":null}),
            json!({"type":"http:response","id":6,"status":200,"headers":{}}),
            json!({"type":"ws:close","id":"6","code":70000}),
            json!({"type":"ws:close","id":"6","code":-1}),
            json!({"type":"ws:close","id":"6","code":"1000"}),
        ] {
            assert!(
                matches!(
                    HostMessage::parse(&bad.to_string()),
                    Decoded::Malformed { id: Some(id), .. } if id == "6"
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            HostMessage::parse(r#"{"type":"http:response","status":"x"}"#),
            Decoded::Malformed { id: None, .. }
        ));
    }

    #[test]
    fn unknown_and_malformed_frames_are_reported_not_fatal() {
        assert_eq!(
            RelayMessage::parse(r#"{"type":"later","id":"1"}"#),
            Decoded::UnknownType("later".into())
        );
        for bad in [
            "{nope",
            "[]",
            "42",
            "\"pong\"",
            "{}",
            r#"{"type":7}"#,
            r#"{"type":"http","id":"1","path":"/"}"#,
            r#"{"type":"ws:frame","id":"1"}"#,
            r#"{"type":"ws:frame","id":"1","data":"!","encoding":"base64"}"#,
            r#"{"type":"ws:close"}"#,
        ] {
            assert!(
                matches!(RelayMessage::parse(bad), Decoded::Malformed { .. }),
                "{bad}"
            );
        }
    }

    #[test]
    fn repeated_request_headers_are_joined_cookies_with_semicolons() {
        let mut map = http::HeaderMap::new();
        map.append("accept", "a".parse().unwrap());
        map.append("accept", "b".parse().unwrap());
        map.append("cookie", "x=1".parse().unwrap());
        map.append("cookie", "y=2".parse().unwrap());
        map.append("set-cookie", "s=1".parse().unwrap());
        map.append("set-cookie", "t=2".parse().unwrap());
        let request = Headers::from_map(&map);
        assert_eq!(
            request.0,
            [
                ("accept".to_owned(), "a, b".to_owned()),
                ("cookie".to_owned(), "x=1; y=2".to_owned()),
                ("set-cookie".to_owned(), "s=1, t=2".to_owned()),
            ]
        );
        let response = Headers::from_response_map(&map);
        assert_eq!(
            response.0[2..],
            [
                ("set-cookie".to_owned(), "s=1".to_owned()),
                ("set-cookie".to_owned(), "t=2".to_owned()),
            ]
        );
    }
}
