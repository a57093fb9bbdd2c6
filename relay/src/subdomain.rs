//! Per-host subdomains (`--base-domain`): `https://<hostId>.<base-domain>/…` reaches host
//! `<hostId>` at `/…`, so a web application's redirects and absolute links work as they
//! do at the root of its own origin; and the cookie that lets a browser keep the client
//! token it was given once in `?token=`.
//!
//! A request whose `Host` (HTTP/1.1) or `:authority` (HTTP/2) is a subdomain of the base
//! domain is rewritten, before routing, to the path route `/hosts/<hostId>/…` and marked
//! ([`Subdomain`]); from there it is served as any client request, with two differences
//! ([`crate::client`]): the host gets no `X-Forwarded-Prefix` (its paths start at `/`),
//! and the token may come from the [`COOKIE`].
//!
//! Browsers cannot send a bearer header when navigating. A subdomain request authorized
//! by `?token=` gets the token back in an `HttpOnly`, `Secure`, `SameSite=Lax` cookie
//! without a `Domain` attribute (so the browser sends it to that host's name only), and
//! later requests carry it. The cookie is taken out of the `Cookie` header before the
//! request reaches the host ([`crate::headers::to_host`]) and, as every credential, never
//! logged.

use axum::extract::Request;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Uri};

use crate::error::ClientError;
use crate::host_id::HostId;

/// The name of the cookie that carries a client token on a host's subdomain. The
/// `__Host-` prefix makes browsers refuse it unless it is `Secure`, for `/` and without
/// a `Domain`: a host's page on one subdomain cannot plant one for its siblings.
pub const COOKIE: &str = "__Host-relay_token";

/// Marks a client request that arrived on a host's subdomain (rewritten to its path
/// route).
#[derive(Debug, Clone, Copy)]
pub struct Subdomain;

/// The hostId a request's authority names under `base` (lowercase, without a leading
/// dot), if it is a subdomain of it: everything before `.<base>`, port ignored.
///
/// ```
/// use relay::subdomain::host_of;
/// assert_eq!(host_of("demo.relay.example.com:8443", "relay.example.com"), Some("demo"));
/// assert_eq!(host_of("Demo.Relay.Example.com", "relay.example.com"), Some("Demo"));
/// assert_eq!(host_of("relay.example.com", "relay.example.com"), None);
/// assert_eq!(host_of("demo.other.com", "relay.example.com"), None);
/// assert_eq!(host_of("xrelay.example.com", "relay.example.com"), None);
/// ```
pub fn host_of<'a>(authority: &'a str, base: &str) -> Option<&'a str> {
    // `host:port`; an IPv6 literal (`[::1]:80`) is never a subdomain.
    let name = match authority.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => authority,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let cut = name.len().checked_sub(base.len() + 1)?;
    let (label, suffix) = name.split_at(cut);
    (suffix.as_bytes()[0] == b'.' && suffix[1..].eq_ignore_ascii_case(base) && !label.is_empty())
        .then_some(label)
}

/// The authority a request was sent to: HTTP/2's `:authority`, else `Host`.
fn authority_of(request: &Request) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok())
}

/// Run before routing: a request for `<hostId>.<base>` goes to the path route of
/// `<hostId>`, marked [`Subdomain`]; any other passes unchanged.
///
/// # Errors
/// A subdomain that names no valid host, or a path that cannot follow it.
pub fn rewrite(request: &mut Request, base: &str) -> Result<(), ClientError> {
    let host = authority_of(request)
        .and_then(|a| host_of(a, base))
        .map(str::to_owned);
    if let Some(host) = host {
        // Validated before it goes into a path: `a/b.<base>` must not reach host `a`.
        if let Err(err) = HostId::parse(&host) {
            return Err(ClientError::from(err));
        }
        // The host is told the name it was reached by (`X-Forwarded-Host`), which an
        // HTTP/2 request carries in the URI this rewrite replaces.
        if !request.headers().contains_key(header::HOST)
            && let Some(authority) = request.uri().authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(header::HOST, value);
        }
        let path_and_query = request
            .uri()
            .path_and_query()
            .map_or("/", PathAndQuery::as_str);
        match format!("/hosts/{host}{path_and_query}").parse::<Uri>() {
            Ok(uri) => {
                *request.uri_mut() = uri;
                request.extensions_mut().insert(Subdomain);
            }
            Err(_) => return Err(ClientError::BadPath),
        }
    }
    Ok(())
}

/// The client token a request's [`COOKIE`] carries, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == COOKIE && !value.is_empty())
        .map(|(_, value)| value.to_owned())
}

/// Removes the [`COOKIE`] from `headers`' `Cookie` header(s), keeping the others in
/// order; a header left empty is removed.
pub fn strip_cookie(headers: &mut HeaderMap) {
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    let is_ours = |pair: &str| {
        pair.trim()
            .split_once('=')
            .is_some_and(|(name, _)| name == COOKIE)
    };
    if !values
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(';').any(is_ours)))
    {
        return;
    }
    headers.remove(header::COOKIE);
    for value in values {
        let Ok(text) = value.to_str() else {
            headers.append(header::COOKIE, value);
            continue;
        };
        let kept: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|pair| !pair.is_empty() && !is_ours(pair))
            .collect();
        if let Ok(kept) = HeaderValue::from_str(&kept.join("; "))
            && !kept.is_empty()
        {
            headers.append(header::COOKIE, kept);
        }
    }
}

/// The `Set-Cookie` value that keeps `token` for later requests to the same host name,
/// or `None` when the token has characters a cookie value cannot carry (RFC 6265 §4.1.1).
pub fn set_cookie(token: &str) -> Option<HeaderValue> {
    let cookie_safe =
        |b: u8| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
    if token.is_empty() || !token.bytes().all(cookie_safe) {
        return None;
    }
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Lax"
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_under_the_base_domain_are_subdomains() {
        let base = "relay.example.com";
        assert_eq!(host_of("a.b.relay.example.com", base), Some("a.b"));
        assert_eq!(host_of("demo.relay.example.com.", base), Some("demo"));
        assert_eq!(host_of(".relay.example.com", base), None);
        assert_eq!(host_of("example.com", base), None);
        assert_eq!(host_of("[::1]:8080", base), None);
        assert_eq!(host_of("demo.relay.example.com:x", base), None);
    }

    #[test]
    fn the_token_cookie_is_found_and_stripped_leaving_the_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            "a=1; __Host-relay_token=tok; b=2".parse().unwrap(),
        );
        headers.append(header::COOKIE, "__Host-relay_token=tok".parse().unwrap());
        headers.append(header::COOKIE, "c=3".parse().unwrap());
        assert_eq!(cookie_token(&headers).as_deref(), Some("tok"));
        strip_cookie(&mut headers);
        let left: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);
        assert_eq!(cookie_token(&headers), None);
        // A cookie merely named alike is not ours.
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "relay_token=1".parse().unwrap());
        strip_cookie(&mut headers);
        assert_eq!(headers[header::COOKIE], "relay_token=1");
    }

    #[test]
    fn a_token_a_cookie_cannot_carry_gets_no_cookie() {
        let value = set_cookie("eyJ.a-b_c.d").unwrap();
        assert_eq!(
            value,
            "__Host-relay_token=eyJ.a-b_c.d; Path=/; HttpOnly; Secure; SameSite=Lax"
        );
        assert!(set_cookie("a;b").is_none());
        assert!(set_cookie("a b").is_none());
        assert!(set_cookie("").is_none());
    }
}
