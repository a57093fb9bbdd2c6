//! The v1 protocol from the agent's side: parsing what the relay sends ([`FromRelay`]) and
//! building what the agent answers ([`ToRelay`]).
//!
//! The mirror of [`crate::protocol`], which is the relay's side; the shared pieces
//! ([`Headers`], [`Encoding`], [`Frame`]) are reused. Parsing is lenient as the contract
//! asks: unknown fields and unknown `type`s are ignored, and a frame that cannot be
//! understood is reported, never fatal to the tunnel.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::protocol::{Encoding, Frame, Headers, encode_base64};

/// A message from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromRelay {
    /// One HTTP exchange to forward to the upstream.
    Http {
        /// The exchange, echoed in the answer.
        id: String,
        /// HTTP method.
        method: String,
        /// Host-local path plus `?query`.
        path: String,
        /// Request headers (lower-case names).
        headers: Headers,
        /// Request body (decoded from base64 when the relay said so).
        body: Vec<u8>,
    },
    /// A client opened a WebSocket: open the matching local one.
    WsOpen {
        /// The channel.
        id: String,
        /// Host-local path.
        path: String,
        /// Query without the leading `?`.
        query: Option<String>,
    },
    /// One client frame for a channel.
    WsFrame {
        /// The channel.
        id: String,
        /// The payload.
        data: Frame,
    },
    /// The client side of a channel closed.
    WsClose {
        /// The channel.
        id: String,
        /// The client's close code.
        code: Option<u16>,
    },
    /// Liveness probe: answer `pong`.
    Ping,
    /// The relay is shutting down: reconnect now, elsewhere.
    Drain {
        /// Why, for the log.
        reason: Option<String>,
    },
}

/// The result of reading one text frame from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A message the agent acts on.
    Message(FromRelay),
    /// Valid JSON with a `type` this agent does not know (forward compatibility).
    UnknownType(String),
    /// Not something the agent can act on; why, for the debug log.
    Malformed(String),
}

/// Every field any v1 relay message may carry, parsed in one pass.
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: Headers,
    body: Option<String>,
    query: Option<String>,
    data: Option<String>,
    encoding: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
}

/// Parses one text frame from the relay.
///
/// ```
/// use relay::agent::wire::{parse, FromRelay, Parsed};
/// assert_eq!(parse(r#"{"type":"ping"}"#), Parsed::Message(FromRelay::Ping));
/// assert!(matches!(parse(r#"{"type":"v2:hello"}"#), Parsed::UnknownType(_)));
/// ```
pub fn parse(text: &str) -> Parsed {
    let raw: Raw = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(err) => return Parsed::Malformed(format!("invalid JSON: {err}")),
    };
    let Some(kind) = raw.kind else {
        return Parsed::Malformed("no type field".into());
    };
    let need = |field: Option<String>, what: &str| {
        field.ok_or_else(|| Parsed::Malformed(format!("{kind} without {what}")))
    };
    let message = (|| {
        Ok(match kind.as_str() {
            "ping" => FromRelay::Ping,
            "drain" => FromRelay::Drain { reason: raw.reason },
            "http" => FromRelay::Http {
                id: need(raw.id, "id")?,
                method: need(raw.method, "method")?,
                path: need(raw.path, "path")?,
                headers: raw.headers,
                body: match decode(raw.body, raw.encoding.as_deref()) {
                    Ok(Frame::Text(s)) => s.into_bytes(),
                    Ok(Frame::Binary(b)) => b,
                    Err(reason) => return Err(Parsed::Malformed(reason.into())),
                },
            },
            "ws:open" => FromRelay::WsOpen {
                id: need(raw.id, "id")?,
                path: need(raw.path, "path")?,
                query: raw.query,
            },
            "ws:frame" => {
                let id = need(raw.id, "id")?;
                let data = need(raw.data, "data")?;
                match decode(Some(data), raw.encoding.as_deref()) {
                    Ok(data) => FromRelay::WsFrame { id, data },
                    Err(reason) => return Err(Parsed::Malformed(reason.into())),
                }
            }
            "ws:close" => FromRelay::WsClose {
                id: need(raw.id, "id")?,
                code: raw.code,
            },
            _ => return Err(Parsed::UnknownType(kind.clone())),
        })
    })();
    match message {
        Ok(message) => Parsed::Message(message),
        Err(parsed) => parsed,
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

/// A response header value: one string, or several lines (`set-cookie`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum HeaderValue {
    /// One value (repeated headers already joined with `, `).
    One(String),
    /// One header line per value; the relay accepts arrays.
    Many(Vec<String>),
}

/// Response headers as the agent sends them: name → string, or → array for `set-cookie`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHeaders(pub Vec<(String, HeaderValue)>);

impl Serialize for ResponseHeaders {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// A message from the agent to the relay.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum ToRelay<'a> {
    /// The answer to an `http` exchange.
    #[serde(rename = "http:response")]
    HttpResponse {
        /// The exchange.
        id: &'a str,
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: &'a ResponseHeaders,
        /// The body as text, or base64 with `encoding`; absent when empty.
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a str>,
        /// `base64` for a body that is not UTF-8.
        #[serde(skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
    },
    /// A frame for the client of a channel.
    #[serde(rename = "ws:frame")]
    WsFrame {
        /// The channel.
        id: &'a str,
        /// Text, or base64 of a binary frame.
        data: &'a str,
        /// `base64` for a binary frame.
        #[serde(skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
    },
    /// The local socket of a channel closed (or could not be opened: 1011).
    #[serde(rename = "ws:close")]
    WsClose {
        /// The channel.
        id: &'a str,
        /// The close code for the client.
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Answer to `ping`.
    #[serde(rename = "pong")]
    Pong,
}

// === impl ToRelay ===

impl ToRelay<'_> {
    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        // Cannot fail: keys are strings, values strings, numbers and flat maps/arrays.
        serde_json::to_string(self).expect("agent messages always serialize")
    }

    /// `ws:frame` text for a frame of a local socket.
    pub fn frame_json(id: &str, frame: &Frame) -> String {
        match frame {
            Frame::Text(text) => ToRelay::WsFrame {
                id,
                data: text,
                encoding: None,
            }
            .to_json(),
            Frame::Binary(bytes) => ToRelay::WsFrame {
                id,
                data: &encode_base64(bytes),
                encoding: Some(Encoding::Base64),
            }
            .to_json(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn value(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn parses_every_relay_message() {
        let http = json!({"type":"http","id":"1","method":"POST","path":"/a?b=1",
            "headers":{"x-a":"1"},"body":"hi","extra":true});
        assert_eq!(
            parse(&http.to_string()),
            Parsed::Message(FromRelay::Http {
                id: "1".into(),
                method: "POST".into(),
                path: "/a?b=1".into(),
                headers: Headers(vec![("x-a".into(), "1".into())]),
                body: b"hi".to_vec(),
            })
        );
        let no_body = json!({"type":"http","id":"2","method":"GET","path":"/","headers":{}});
        assert!(matches!(
            parse(&no_body.to_string()),
            Parsed::Message(FromRelay::Http { body, .. }) if body.is_empty()
        ));
        assert_eq!(
            parse(r#"{"type":"ws:open","id":"3","path":"/ws","query":"a=1"}"#),
            Parsed::Message(FromRelay::WsOpen {
                id: "3".into(),
                path: "/ws".into(),
                query: Some("a=1".into())
            })
        );
        assert_eq!(
            parse(r#"{"type":"ws:frame","id":"3","data":"AAE=","encoding":"base64"}"#),
            Parsed::Message(FromRelay::WsFrame {
                id: "3".into(),
                data: Frame::Binary(vec![0, 1])
            })
        );
        assert_eq!(
            parse(r#"{"type":"ws:close","id":"3","code":1000}"#),
            Parsed::Message(FromRelay::WsClose {
                id: "3".into(),
                code: Some(1000)
            })
        );
        assert_eq!(
            parse(r#"{"type":"drain","reason":"deploy"}"#),
            Parsed::Message(FromRelay::Drain {
                reason: Some("deploy".into())
            })
        );
    }

    #[test]
    fn unknown_and_malformed_frames_are_reported_not_fatal() {
        assert_eq!(
            parse(r#"{"type":"later","id":"1"}"#),
            Parsed::UnknownType("later".into())
        );
        for bad in [
            "{nope",
            "[]",
            "{}",
            r#"{"type":"http","id":"1","path":"/"}"#,
            r#"{"type":"ws:frame","id":"1"}"#,
            r#"{"type":"ws:frame","id":"1","data":"!","encoding":"base64"}"#,
            r#"{"type":"ws:close"}"#,
        ] {
            assert!(matches!(parse(bad), Parsed::Malformed(_)), "{bad}");
        }
    }

    #[test]
    fn responses_serialize_as_v1() {
        let headers = ResponseHeaders(vec![
            ("content-type".into(), HeaderValue::One("text/plain".into())),
            (
                "set-cookie".into(),
                HeaderValue::Many(vec!["a=1".into(), "b=2".into()]),
            ),
        ]);
        let text = ToRelay::HttpResponse {
            id: "7",
            status: 200,
            headers: &headers,
            body: Some("ok"),
            encoding: None,
        }
        .to_json();
        assert_eq!(
            value(&text),
            json!({"type":"http:response","id":"7","status":200,
                "headers":{"content-type":"text/plain","set-cookie":["a=1","b=2"]},"body":"ok"})
        );
        let text = ToRelay::HttpResponse {
            id: "8",
            status: 204,
            headers: &ResponseHeaders::default(),
            body: None,
            encoding: None,
        }
        .to_json();
        assert_eq!(
            value(&text),
            json!({"type":"http:response","id":"8","status":204,"headers":{}})
        );
        assert_eq!(value(&ToRelay::Pong.to_json()), json!({"type":"pong"}));
        assert_eq!(
            value(
                &ToRelay::WsClose {
                    id: "3",
                    code: None
                }
                .to_json()
            ),
            json!({"type":"ws:close","id":"3"})
        );
    }

    #[test]
    fn binary_frames_go_as_base64() {
        assert_eq!(
            value(&ToRelay::frame_json("5", &Frame::Binary(vec![0, 1, 2]))),
            json!({"type":"ws:frame","id":"5","data":"AAEC","encoding":"base64"})
        );
        assert_eq!(
            value(&ToRelay::frame_json("5", &Frame::Text("hé".into()))),
            json!({"type":"ws:frame","id":"5","data":"hé"})
        );
        // What the agent sends, the relay's parser understands.
        let text = ToRelay::frame_json("5", &Frame::Binary(vec![9]));
        assert_eq!(
            crate::protocol::parse_host_message(&text),
            crate::protocol::Inbound::Message(crate::protocol::HostMessage::WsFrame {
                id: "5".into(),
                data: Frame::Binary(vec![9])
            })
        );
    }
}
