//! Which headers cross which hop, in one place: client → relay → host (the tunnel),
//! relay → peer relay, agent → local service, and the answers back.
//!
//! The rules (RFC 9110 §7.6.1, RFC 9113 §8.2.2):
//! - hop-by-hop headers, and every header the `Connection` header lists, describe one
//!   connection and never cross a hop; `TE` crosses only as `trailers` (gRPC needs it),
//!   and `Trailer` always crosses (it announces trailers end to end);
//! - the WebSocket handshake headers (`Sec-WebSocket-Key`, `-Version`, `-Accept`,
//!   `-Extensions`) belong to one hop's handshake, each hop makes its own; only the
//!   subprotocol (`Sec-WebSocket-Protocol`) is end to end;
//! - `Host` and `Content-Length` are recomputed by each hop's HTTP client;
//! - `Expect: 100-continue` is answered by each hop itself (the relay's server sends
//!   `100 Continue` when it first reads the body), so it does not cross;
//! - the client's credentials (`Authorization`) are for the relay, never the host; a peer
//!   relay gets them unchanged, since it authorizes the client again;
//! - headers only relays may set ([`HOP`], [`HOP_AUTH`], [`NOT_HERE`]) are dropped
//!   where they would reach a host or a client, and a hop marker counts only with the
//!   relays' shared key in [`HOP_AUTH`], so neither can pass for a relay;
//! - `X-Forwarded-For` gets the peer's address appended at every relay, also when the
//!   peer is another relay: a client can send a hop marker too, so trusting it to skip
//!   the append would let a client forge the whole chain. `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are the relay's, unless a trusted proxy set them; so is
//!   `X-Forwarded-Prefix` (a peer relay's is kept);
//! - the relay's own cookie ([`crate::subdomain::COOKIE`]) is a credential like
//!   `Authorization`: a peer relay gets it, a host never does.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Marks a request forwarded by a peer relay; its value is the forwarding machine.
pub const HOP: &str = "x-relay-hop";

/// On a forwarded request: the secret shared by the relays of one directory
/// ([`crate::directory::Directory::hop_key`]), proving [`HOP`] comes from a relay.
pub const HOP_AUTH: &str = "x-relay-hop-auth";

/// On a 503 to a forwarded request: this machine does not hold the host, and nothing was
/// sent to any host, so the forwarding relay may try the current owner instead. Never
/// shown to clients.
pub const NOT_HERE: &str = "x-relay-not-here";

// The names this module writes or compares on every request, made once: a name given
// as a string is parsed (and, for a new entry, copied) on every use.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
/// [`HOP`] as a name, for lookups on every request.
pub(crate) const HOP_NAME: HeaderName = HeaderName::from_static(HOP);
const HOP_AUTH_NAME: HeaderName = HeaderName::from_static(HOP_AUTH);
const NOT_HERE_NAME: HeaderName = HeaderName::from_static(NOT_HERE);

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), or that
/// only a proxy consumes (`Proxy-Authenticate`, `Proxy-Authorization`), and must not be
/// forwarded. `Trailer` is end to end (it announces the trailers that follow; an
/// HTTP/1.1 hop needs it to send them).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers of one hop's WebSocket handshake.
fn is_websocket_handshake(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-accept"
            | "sec-websocket-extensions"
    )
}

/// Headers only relays may set.
fn is_relay_only(name: &HeaderName) -> bool {
    *name == HOP_NAME || *name == HOP_AUTH_NAME || *name == NOT_HERE_NAME
}

/// Whether `headers` carry the relays' hop key `key` (compared in constant time).
pub fn hop_authenticated(headers: &HeaderMap, key: Option<&str>) -> bool {
    let (Some(key), Some(sent)) = (key, headers.get(HOP_AUTH_NAME)) else {
        return false;
    };
    let (key, sent) = (key.as_bytes(), sent.as_bytes());
    key.len() == sent.len() && key.iter().zip(sent).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The names the `Connection` header lists: they are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Copies `headers` without those `skip` names and those that never cross a hop; a `TE`
/// that asks for trailers crosses as `te: trailers`.
fn copy_end_to_end(headers: &HeaderMap, skip: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len() + 3);
    for (name, value) in headers {
        if crosses(name, &listed, &skip) {
            out.append(name.clone(), value.clone());
        }
    }
    if asks_for_trailers(headers) {
        out.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    out
}

/// [`copy_end_to_end`] without the copy when every header crosses: most requests the
/// agent gets, as the relay has already removed what does not. Otherwise a copy, which
/// keeps the order of the headers (removing in place would not).
fn end_to_end(headers: HeaderMap, skip: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let listed = connection_listed(&headers);
    if headers.keys().all(|name| crosses(name, &listed, &skip)) {
        headers
    } else {
        copy_end_to_end(&headers, skip)
    }
}

/// Whether a header named `name` crosses the hop: it does unless it is `TE` (see
/// [`asks_for_trailers`]), hop-by-hop, a WebSocket handshake's, listed in `Connection`
/// (`listed`) or `skip`ped.
fn crosses(name: &HeaderName, listed: &[String], skip: impl Fn(&HeaderName) -> bool) -> bool {
    !(name == header::TE
        || is_hop_by_hop(name)
        || is_websocket_handshake(name)
        || skip(name)
        || listed.iter().any(|n| n == name.as_str()))
}

/// Whether a `TE` header asks for trailers, the one thing of it that crosses a hop.
fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

/// Where a client request's `X-Forwarded-*` headers come from.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// The request came through a proxy the relay trusts: a peer relay (proved by the hop
    /// key), or the platform's proxy (`--client-ip-header` is set). Its
    /// `X-Forwarded-Proto` and `-Host` are kept; anyone else's are replaced, so a client
    /// cannot make an application build its URLs on another scheme or host.
    pub trusted: bool,
    /// The client reached this relay over TLS (`X-Forwarded-Proto: https`).
    pub secure: bool,
    /// `X-Forwarded-Prefix`: where the host's paths start on the relay.
    pub prefix: Prefix,
}

/// Where a host's paths start on the relay, for its `X-Forwarded-Prefix`: always the
/// relays' to say, never a client's.
#[derive(Debug, Clone, Default)]
pub enum Prefix {
    /// At the root (a host's subdomain): no `X-Forwarded-Prefix`.
    #[default]
    Root,
    /// Under a path (`/hosts/<id>`), so an application behind path routing can build
    /// its own URLs.
    Path(String),
    /// As the peer relay that forwarded the request said (it saw the client's request).
    FromPeer,
}

/// Appends `ip` as text. An IPv4 address, nearly every client's, without the formatting
/// machinery (a quarter of what building the `X-Forwarded-*` headers cost per request).
fn push_address(out: &mut String, ip: IpAddr) {
    use std::fmt::Write as _;
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `peer` to `X-Forwarded-For`; sets `X-Forwarded-Proto` (`https` when the
/// relay terminated TLS, else `http`) and `X-Forwarded-Host` (the request's `Host`)
/// unless a trusted proxy set them ([`Forwarded`]); sets `X-Forwarded-Prefix` as
/// [`Prefix`] says.
fn add_forwarded(out: &mut HeaderMap, headers: &HeaderMap, peer: IpAddr, forwarded: &Forwarded) {
    // The chain, then the peer: written once into one buffer (an address is at most 39
    // characters), not formatted into strings and copied again.
    let mut chain = String::with_capacity(48);
    for prior in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str() {
            chain.push_str(prior);
            chain.push_str(", ");
        }
    }
    push_address(&mut chain, peer);
    if let Ok(chain) = HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)) {
        out.insert(X_FORWARDED_FOR, chain);
    }
    if !(forwarded.trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if forwarded.secure { "https" } else { "http" };
        out.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(forwarded.trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match headers.get(header::HOST) {
            Some(host) => {
                out.insert(X_FORWARDED_HOST, host.clone());
            }
            None => {
                out.remove(&X_FORWARDED_HOST);
            }
        }
    }
    match &forwarded.prefix {
        Prefix::FromPeer => {}
        Prefix::Root => {
            out.remove(&X_FORWARDED_PREFIX);
        }
        Prefix::Path(prefix) => match HeaderValue::from_str(prefix) {
            Ok(prefix) => {
                out.insert(X_FORWARDED_PREFIX, prefix);
            }
            Err(_) => {
                out.remove(&X_FORWARDED_PREFIX);
            }
        },
    }
}

/// The request headers a host gets for a client request that reached this relay from
/// `peer`: credentials (the `Authorization` header, the token cookie of
/// [`crate::subdomain`]), `Host`, `Content-Length`, relay-only headers and everything
/// hop-by-hop removed, `X-Forwarded-*` added.
pub fn to_host(headers: &HeaderMap, peer: IpAddr, forwarded: &Forwarded) -> HeaderMap {
    let mut out = copy_end_to_end(headers, |name| {
        name == header::AUTHORIZATION
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
            || *name == X_FORWARDED_FOR
            || is_relay_only(name)
    });
    crate::subdomain::strip_cookie(&mut out);
    add_forwarded(&mut out, headers, peer, forwarded);
    out
}

/// The request headers a peer relay gets for a client request forwarded by `me` (this
/// machine): the client's, credentials included (the peer authorizes again), minus what
/// never crosses a hop, plus the hop marker and the forwarding chain.
pub fn to_peer(
    headers: &HeaderMap,
    peer: IpAddr,
    me: &str,
    key: Option<&str>,
    forwarded: &Forwarded,
) -> HeaderMap {
    let mut out = copy_end_to_end(headers, |name| {
        name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
            || *name == X_FORWARDED_FOR
            || is_relay_only(name)
    });
    if let Ok(me) = HeaderValue::from_str(me) {
        out.insert(HOP_NAME, me);
    }
    if let Some(Ok(key)) = key.map(HeaderValue::from_str) {
        out.insert(HOP_AUTH_NAME, key);
    }
    add_forwarded(&mut out, headers, peer, forwarded);
    out
}

/// Removes from a host's (or peer relay's) response what must not reach the client: the
/// hop-by-hop headers, those its `Connection` header lists, and relay-only headers.
pub fn from_host(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            is_hop_by_hop(name)
                || is_websocket_handshake(name)
                || is_relay_only(name)
                || listed.iter().any(|n| n == name.as_str())
        })
        .cloned()
        .collect();
    for name in drop {
        headers.remove(name);
    }
}

/// The request headers the agent sends its local service: the relay's, minus what never
/// crosses a hop, `Host` (the agent's client sets the upstream's) and `Content-Length`
/// (the agent's client frames the body). The relay has already removed all of that
/// from what it sent, so there is usually nothing to do.
pub fn to_upstream(headers: HeaderMap) -> HeaderMap {
    end_to_end(headers, |name| {
        name == header::HOST || name == header::CONTENT_LENGTH
    })
}

/// Removes from a local service's response what must not cross the tunnel.
pub fn from_upstream(headers: &mut HeaderMap) {
    from_host(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_ip() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    #[test]
    fn addresses_are_written_as_the_standard_library_writes_them() {
        let mut samples: Vec<IpAddr> = ["0.0.0.0", "9.10.99.100", "255.255.255.255", "::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        samples.push("2001:db8::7".parse().unwrap());
        samples.extend((0..=255u8).map(|n| IpAddr::from([n, 255 - n, n / 2, 7])));
        for ip in samples {
            let mut out = String::from("x, ");
            push_address(&mut out, ip);
            assert_eq!(out, format!("x, {ip}"));
        }
    }

    #[test]
    fn a_host_never_sees_credentials_hop_by_hop_or_relay_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        headers.insert(header::HOST, "relay.example".parse().unwrap());
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "3".parse().unwrap());
        headers.append(header::ACCEPT, "a".parse().unwrap());
        headers.append(header::ACCEPT, "b".parse().unwrap());
        headers.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        headers.insert(HOP, "ams:a".parse().unwrap());
        headers.insert(HOP_AUTH, "key".parse().unwrap());
        headers.insert(NOT_HERE, "1".parse().unwrap());
        headers.insert("sec-websocket-key", "k".parse().unwrap());
        headers.insert("sec-websocket-protocol", "chat".parse().unwrap());
        headers.insert(header::EXPECT, "100-continue".parse().unwrap());
        let out = to_host(&headers, client_ip(), &Forwarded::default());
        for gone in [
            "authorization",
            "host",
            "connection",
            "x-private",
            "transfer-encoding",
            "content-length",
            HOP,
            HOP_AUTH,
            NOT_HERE,
            "sec-websocket-key",
            "te",
            "expect",
        ] {
            assert!(!out.contains_key(gone), "{gone} crossed");
        }
        let accept: Vec<_> = out.get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["a", "b"]);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "relay.example");
        assert_eq!(out["sec-websocket-protocol"], "chat");
    }

    #[test]
    fn te_crosses_only_as_trailers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, "gzip, trailers".parse().unwrap());
        assert_eq!(
            to_host(&headers, client_ip(), &Forwarded::default())[header::TE],
            "trailers"
        );
        headers.insert(header::TE, "gzip".parse().unwrap());
        assert!(!to_host(&headers, client_ip(), &Forwarded::default()).contains_key(header::TE));
    }

    #[test]
    fn a_peer_gets_the_credentials_and_the_hop_marker() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer c".parse().unwrap());
        headers.insert(HOP, "forged".parse().unwrap());
        headers.insert(header::HOST, "relay.example".parse().unwrap());
        headers.insert(HOP_AUTH, "forged-key".parse().unwrap());
        let out = to_peer(
            &headers,
            client_ip(),
            "ams:m1",
            Some("the-key"),
            &Forwarded::default(),
        );
        assert_eq!(out[header::AUTHORIZATION], "Bearer c");
        assert_eq!(out[HOP], "ams:m1");
        assert_eq!(out[HOP_AUTH], "the-key", "the client's value is replaced");
        assert!(hop_authenticated(&out, Some("the-key")));
        assert!(!hop_authenticated(&out, Some("the-kez")));
        assert!(!hop_authenticated(&out, Some("the-key-longer")));
        assert!(
            !hop_authenticated(&out, None),
            "no key known: nothing is a hop"
        );
        assert!(!hop_authenticated(&headers, Some("the-key")));
        assert_eq!(out["x-forwarded-for"], "192.0.2.7");
        assert_eq!(out["x-forwarded-host"], "relay.example");
        assert!(!out.contains_key(header::HOST));
    }

    #[test]
    fn responses_lose_hop_by_hop_and_relay_only_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "x-conn".parse().unwrap());
        headers.insert("x-conn", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(NOT_HERE, "1".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        headers.append(header::SET_COOKIE, "a=1".parse().unwrap());
        headers.append(header::SET_COOKIE, "b=2".parse().unwrap());
        from_host(&mut headers);
        let mut names: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "set-cookie"]);
        assert_eq!(headers.get_all(header::SET_COOKIE).iter().count(), 2);
    }

    #[test]
    fn a_peer_relays_prefix_is_kept_as_sent_and_a_subdomain_gets_none() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-prefix", "/hosts/h".parse().unwrap());
        let from_peer = Forwarded {
            trusted: true,
            secure: false,
            prefix: Prefix::FromPeer,
        };
        assert_eq!(
            to_host(&headers, client_ip(), &from_peer)["x-forwarded-prefix"],
            "/hosts/h"
        );
        assert!(
            !to_host(&HeaderMap::new(), client_ip(), &from_peer).contains_key("x-forwarded-prefix"),
            "a subdomain request forwarded by a peer has none"
        );
        // The edge relay says which to the peer; a client's never passes.
        let root = Forwarded::default();
        let to_the_peer = to_peer(&headers, client_ip(), "ams:m1", None, &root);
        assert!(!to_the_peer.contains_key("x-forwarded-prefix"));
        let secure = Forwarded {
            secure: true,
            ..Forwarded::default()
        };
        assert_eq!(
            to_host(&headers, client_ip(), &secure)["x-forwarded-proto"],
            "https"
        );
    }

    #[test]
    fn an_upstream_gets_no_host_or_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "client.example".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "3".parse().unwrap());
        headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        let out = to_upstream(headers);
        let names: Vec<_> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-forwarded-for"]);
    }

    #[test]
    fn headers_that_all_cross_are_kept_as_they_are_and_others_copied_in_order() {
        let skip = |name: &HeaderName| name == header::HOST || name == header::CONTENT_LENGTH;
        let samples: [&[(&str, &str)]; 6] = [
            &[
                ("x-forwarded-for", "1.2.3.4"),
                ("accept", "*/*"),
                ("accept", "a"),
            ],
            &[
                ("connection", "keep-alive, x-private"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("host", "h"),
                ("content-length", "3"),
            ],
            &[("te", "gzip, trailers"), ("transfer-encoding", "chunked")],
            &[
                ("te", "gzip"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ],
            &[
                ("te", "deflate"),
                ("te", "Trailers"),
                ("accept", "a"),
                ("accept", "b"),
            ],
            &[("zz", "1"), ("host", "h"), ("aa", "2"), ("mm", "3")],
        ];
        let listed = |headers: &HeaderMap| -> Vec<(String, String)> {
            headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                .collect()
        };
        for sample in samples {
            let mut headers = HeaderMap::new();
            for (name, value) in sample {
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let copied = copy_end_to_end(&headers, skip);
            assert_eq!(listed(&to_upstream(headers)), listed(&copied), "{sample:?}");
        }
    }
}
