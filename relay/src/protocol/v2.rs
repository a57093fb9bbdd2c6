//! Superset's tunnel "v2" (dial-back), the wire contract of its newer host client
//! (`tunnel-client-v2.ts`, `packages/shared/src/tunnel-v2-protocol.ts`), implemented
//! unchanged so that those hosts need nothing new. Not to be confused with our own `h2`.
//!
//! - The host keeps one **control** WebSocket (`GET /v2/control?hostId=&token=`): it
//!   sends [`PING`] every 30 s and gets [`PONG`]; the relay sends one [`StreamDial`] per
//!   stream it wants.
//! - For each dial the host opens a fresh WebSocket, `GET /v2/dial?hostId=&ticket=`: the
//!   one-time ticket is its only credential. A `ws` dial is then spliced to the client's
//!   WebSocket frame for frame; an `http` dial carries one exchange in the frames below
//!   ([`HttpRequestHead`], binary body chunks, [`HTTP_END`]; the host answers the same
//!   way with [`HttpResponseHead`]).
//! - Close codes ([`close`]) have fixed meanings the host acts on.
//!
//! A ticket names the machine that issued it ([`Ticket`]), so a dial that lands on
//! another machine of the fleet is carried to the one waiting for it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::directory::Owner;

/// `/health` answers `"proto": 2`: what superset's host client looks for to choose v2.
pub const HEALTH_PROTO: u32 = 2;

/// The host's keepalive on the control channel.
pub const PING: &str = r#"{"type":"ping"}"#;

/// The relay's answer to [`PING`].
pub const PONG: &str = r#"{"type":"pong"}"#;

/// The end of a request or response on an `http` dial.
pub const HTTP_END: &str = r#"{"type":"http:end"}"#;

/// Largest body chunk the relay sends as one binary frame on an `http` dial: 256 KiB,
/// what superset's host client and relay use (below a Durable Object's message ceiling).
pub const BODY_CHUNK: usize = 256 * 1024;

/// Application close codes (4400–4499) with fixed recovery semantics.
pub mod close {
    /// Malformed upgrade (missing hostId or ticket, bad message): fix the caller.
    pub const BAD_REQUEST: u16 = 4400;
    /// Token missing, invalid or expired: mint a fresh one, then reconnect.
    pub const AUTH_EXPIRED: u16 = 4401;
    /// Token valid, access denied: retry slowly.
    pub const FORBIDDEN: u16 = 4403;
    /// Dial ticket unknown, expired or already used: abandon this stream.
    pub const UNKNOWN_TICKET: u16 = 4404;
    /// No keepalive from the host within the stale window: reconnect now.
    pub const STALE_HOST: u16 = 4408;
    /// A newer control channel for the same host registered: do not reconnect over it.
    pub const REPLACED: u16 = 4409;
    /// The host's control channel went away: this stream is dead.
    pub const TUNNEL_GONE: u16 = 4410;
}

/// What a stream is: a client WebSocket, or one HTTP exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialKind {
    /// A WebSocket, spliced frame for frame.
    Ws,
    /// One HTTP exchange in [`HttpRequestHead`] / [`HttpResponseHead`] frames.
    Http,
}

/// Relay → host on the control channel: dial back for one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDial<'a> {
    /// Always `stream:dial`.
    #[serde(rename = "type")]
    pub kind_tag: &'a str,
    /// The one-time credential of the dial.
    pub ticket: &'a str,
    /// What the stream is.
    pub kind: DialKind,
    /// Host-local path (`ws`), or path and query (`http`).
    pub path: &'a str,
    /// Raw query string without `?` (`ws` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<&'a str>,
}

impl<'a> StreamDial<'a> {
    /// The dial message for `ticket`.
    pub fn new(ticket: &'a str, kind: DialKind, path: &'a str, query: Option<&'a str>) -> Self {
        StreamDial {
            kind_tag: "stream:dial",
            ticket,
            kind,
            path,
            query,
        }
    }

    /// The message as sent.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Relay → host on an `http` dial: the request head. The body follows as binary frames,
/// then [`HTTP_END`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequestHead {
    /// Always `http:request`.
    #[serde(rename = "type")]
    pub kind_tag: String,
    /// The client's method.
    pub method: String,
    /// Host-local path and query.
    pub path: String,
    /// One value per name (repeated headers joined, as `fetch` does).
    pub headers: BTreeMap<String, String>,
}

/// Host → relay on an `http` dial: the response head. The body follows as binary frames,
/// then [`HTTP_END`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponseHead {
    /// The status code.
    pub status: u16,
    /// One value per name.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A text frame on an `http` dial or the control channel, by its `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type")]
pub enum Message {
    /// `{"type":"ping"}` (control).
    #[serde(rename = "ping")]
    Ping,
    /// `http:response` (dial).
    #[serde(rename = "http:response")]
    HttpResponse(HttpResponseHead),
    /// `http:end` (dial).
    #[serde(rename = "http:end")]
    HttpEnd,
    /// Anything else with a `type`: ignored, as superset's relay does, so a newer host
    /// can add messages.
    #[serde(other)]
    Other,
}

impl Message {
    /// Parses a text frame.
    ///
    /// # Errors
    /// When it is not a JSON object with a string `type` (the host is at fault).
    pub fn parse(text: &str) -> Result<Message, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// A dial ticket: 128 random bits, and the machine that issued it, so that a dial
/// landing on another machine can be carried there. On the wire:
/// `<32 hex digits>.<region>:<machineId>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    secret: String,
    issuer: Owner,
}

impl Ticket {
    /// A new ticket issued by `issuer`.
    pub fn issue(issuer: &Owner) -> Ticket {
        use rand::RngCore as _;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Ticket {
            secret: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            issuer: issuer.clone(),
        }
    }

    /// Parses a ticket a host presents; `None` for anything the relay cannot have issued.
    pub fn parse(s: &str) -> Option<Ticket> {
        let (secret, issuer) = s.split_once('.')?;
        if secret.len() != 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Ticket {
            secret: secret.to_ascii_lowercase(),
            issuer: issuer.parse().ok()?,
        })
    }

    /// The machine that issued it.
    pub fn issuer(&self) -> &Owner {
        &self.issuer
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.secret, self.issuer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dial_is_written_as_superset_reads_it() {
        let ws = StreamDial::new("t1", DialKind::Ws, "/terminal/1", Some("a=b")).to_json();
        assert_eq!(
            ws,
            r#"{"type":"stream:dial","ticket":"t1","kind":"ws","path":"/terminal/1","query":"a=b"}"#
        );
        let http = StreamDial::new("t2", DialKind::Http, "/trpc/x?y=1", None).to_json();
        assert_eq!(
            http,
            r#"{"type":"stream:dial","ticket":"t2","kind":"http","path":"/trpc/x?y=1"}"#
        );
    }

    #[test]
    fn host_messages_are_read_by_type() {
        assert_eq!(Message::parse(PING).unwrap(), Message::Ping);
        assert_eq!(Message::parse(HTTP_END).unwrap(), Message::HttpEnd);
        let head = Message::parse(
            r#"{"type":"http:response","status":201,"headers":{"content-type":"text/plain"}}"#,
        )
        .unwrap();
        let Message::HttpResponse(head) = head else {
            panic!("not a response head: {head:?}")
        };
        assert_eq!(head.status, 201);
        assert_eq!(head.headers["content-type"], "text/plain");
        assert_eq!(
            Message::parse(r#"{"type":"later"}"#).unwrap(),
            Message::Other
        );
        assert!(Message::parse("not json").is_err());
        assert!(Message::parse(r#"{"no":"type"}"#).is_err());
    }

    #[test]
    fn tickets_name_their_issuer_and_refuse_forgeries() {
        let issuer: Owner = "ams:m-1.a".parse().unwrap();
        let ticket = Ticket::issue(&issuer);
        let wire = ticket.to_string();
        let parsed = Ticket::parse(&wire).unwrap();
        assert_eq!(parsed, ticket);
        assert_eq!(parsed.issuer(), &issuer);
        assert_ne!(Ticket::issue(&issuer), ticket, "tickets are random");
        for bad in [
            "",
            "abc",
            "zz.ams:m1",
            &format!("{}.ams", "a".repeat(32)),
            &format!("{}.:m1", "a".repeat(32)),
            &format!("{}.ams:m1", "g".repeat(32)),
        ] {
            assert!(Ticket::parse(bad).is_none(), "{bad:?}");
        }
    }
}
