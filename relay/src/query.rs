//! The relay's own query parameter: `token`, a bearer token for the relay (never for the
//! host), in whatever spelling a client sends it.
//!
//! Keys are compared decoded: `?%74oken=…` authenticates like `?token=…`
//! ([`crate::auth::bearer_token`] reads the decoded query), so it must be stripped before
//! the request reaches the host and redacted from every log line just the same.

/// Whether the raw (still percent-encoded) key of a query pair names `token`, decoded and
/// in any case: the relay strips and redacts at least every spelling it accepts.
///
/// ```
/// use relay::query::is_token_key;
/// assert!(is_token_key("token"));
/// assert!(is_token_key("%74oken"));
/// assert!(is_token_key("TOKEN"));
/// assert!(!is_token_key("tokens"));
/// ```
pub fn is_token_key(raw: &str) -> bool {
    // Five letters, or their percent-encodings (three bytes each).
    if raw.len() < 5 || raw.len() > 15 {
        return false;
    }
    if !raw.contains('%') && !raw.contains('+') {
        return raw.eq_ignore_ascii_case("token");
    }
    form_urlencoded::parse(raw.as_bytes())
        .next()
        .is_some_and(|(key, value)| value.is_empty() && key.eq_ignore_ascii_case("token"))
}

/// `query` without its `token` parameters (see [`is_token_key`]); the other pairs keep
/// their exact encoding and order. `None` when nothing is left.
///
/// ```
/// use relay::query::strip_token;
/// assert_eq!(strip_token(Some("a=1&%74oken=x&b")), Some("a=1&b".to_owned()));
/// assert_eq!(strip_token(Some("token=x")), None);
/// ```
pub fn strip_token(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && !is_token_key(key)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_stripped_and_the_rest_kept_verbatim() {
        assert_eq!(
            strip_token(Some("a=1&token=x&b=%20")),
            Some("a=1&b=%20".into())
        );
        assert_eq!(strip_token(Some("token=x")), None);
        assert_eq!(
            strip_token(Some("tokens=1&flag")),
            Some("tokens=1&flag".into())
        );
        assert_eq!(strip_token(None), None);
    }

    #[test]
    fn every_spelling_of_the_token_key_is_recognised() {
        for key in [
            "token",
            "Token",
            "%74oken",
            "t%6Fken",
            "%74%6F%6B%65%6E",
            "%54OKEN",
        ] {
            assert!(is_token_key(key), "{key}");
            assert_eq!(
                strip_token(Some(&format!("a=1&{key}=secret"))),
                Some("a=1".into())
            );
        }
        for key in ["tokenx", "to+ken", "%74oke", "tok%65n%00", "x"] {
            assert!(!is_token_key(key), "{key}");
        }
    }
}
