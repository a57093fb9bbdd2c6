//! What travels on a tunnel (see `docs/protocol.md`): the close codes and identifiers
//! both protocols share, and one codec per protocol, used by the relay and the agent
//! alike.
//!
//! - [`v1`]: the JSON protocol existing host agents speak (text frames only).
//! - [`h2`]: HTTP/2 inside the tunnel, negotiated with the `relay-h2` subprotocol.
//! - [`v2`]: superset's dial-back tunnels (`/v2/control`, `/v2/dial`), for its newer
//!   host client, unchanged.

pub mod h2;
pub mod v1;
pub mod v2;

use std::fmt;

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

    /// Whether an application may close a WebSocket with `code` itself: a WHATWG
    /// `WebSocket.close()` (a browser's, Node's, Bun's) throws on anything but 1000 and
    /// 3000–4999, and v1 hosts pass the code of a `ws:close` to exactly that call.
    pub fn is_for_application(code: u16) -> bool {
        matches!(code, 1000 | 3000..=4999)
    }

    /// What a code the relay cannot hand an application means, for the `reason` that
    /// goes with the 1000 it sends instead.
    pub fn meaning(code: u16) -> &'static str {
        match code {
            GOING_AWAY => "going away",
            1002 => "protocol error",
            1003 => "unsupported data",
            1005 => "no code",
            1006 => "closed abnormally",
            1007 => "invalid payload",
            POLICY => "policy violation",
            TOO_BIG => "message too big",
            1010 => "extension required",
            INTERNAL => "internal error",
            TRY_AGAIN_LATER => "try again later",
            _ => "closed",
        }
    }
}

/// A response header of the relay's tunnel upgrade (`101`): the relay serves hosts on
/// subdomains of this domain too (`--base-domain`), so an agent can say where its host
/// is reached. Clients that do not know it ignore it, as they do every header.
pub const BASE_DOMAIN_HEADER: &str = "x-relay-base-domain";

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

/// One WebSocket data frame carried over a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(bytes::Bytes),
}

impl Frame {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(text) => text.len(),
            Frame::Binary(bytes) => bytes.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the frame costs while it waits in a queue, counted against a byte budget: its
    /// payload and [`crate::limits::QUEUED_FRAME_OVERHEAD`] for its slot and allocation,
    /// so a flood of empty frames is bounded too.
    pub fn queued_cost(&self) -> usize {
        self.len() + crate::limits::QUEUED_FRAME_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
