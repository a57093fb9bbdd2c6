//! The local service: HTTP exchanges over a pooled client, and WebSocket upgrades.
//!
//! Nothing here can take a tunnel down: an upstream that is down, refuses or times out
//! becomes a `502` for that one exchange (or a failed channel), never an error of the
//! tunnel. Both protocols use it: v1 buffers what it gets from here, `h2` streams it.

use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::{debug, warn};

use super::config::UpstreamUrl;
use crate::headers;
use crate::limits::agent::{
    UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_POOL_IDLE, UPSTREAM_TIMEOUT, UPSTREAM_WS_REFUSAL_BODY,
};

/// At most one warning per this interval about a failing upstream: when the service is
/// down every request fails, and the log must not drown.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why the upstream gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request cannot be expressed (bad method or path): 400.
    #[error("{0}")]
    BadRequest(&'static str),
    /// Connecting, sending or reading the head failed: 502.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// No response head within [`UPSTREAM_TIMEOUT`] after the request was sent: 502.
    #[error("upstream timed out")]
    TimedOut,
}

impl Failure {
    /// The answer the agent makes itself for this failure.
    pub fn response(&self) -> Response<Body> {
        match self {
            Failure::BadRequest(why) => error_response(StatusCode::BAD_REQUEST, why),
            Failure::Unavailable(_) => {
                error_response(StatusCode::BAD_GATEWAY, "upstream unavailable")
            }
            Failure::TimedOut => error_response(StatusCode::BAD_GATEWAY, "upstream timed out"),
        }
    }
}

/// An answer the agent makes itself, in the relay's shape: `{"error": message}`, so a
/// client reads the agent's errors as it reads the relay's.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A local WebSocket whose upgrade succeeded: the raw stream after the handshake, and
/// the service's `101` answer (its chosen subprotocol among the headers).
pub struct LocalWebSocket {
    /// The upgraded connection: WebSocket frames from here on.
    pub io: TokioIo<Upgraded>,
    /// The service's answer.
    pub response: Response<()>,
}

/// What the service answered to a WebSocket upgrade.
pub enum Upgrade {
    /// Upgraded.
    Open(LocalWebSocket),
    /// The service answered something else (404, 403, ...): passed on to the client.
    Refused(Response<Body>),
}

/// The local service and a connection pool to it. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Upstream {
    url: UpstreamUrl,
    /// The parts of every request's URI that do not change, parsed once: building a
    /// URI from text costs a format and a parse per request (see [`Upstream::uri`]).
    authority: Option<Authority>,
    /// The `Host` of every HTTP/1.1 request, as hyper-util would write it (host, and
    /// the port unless 80) if it had to, which it does by formatting on every request.
    /// `None` for an `h2c://` service: HTTP/2 names it in `:authority`.
    host: Option<HeaderValue>,
    client: Client<HttpConnector, Body>,
    /// When the last upstream failure was logged at WARN, and how many were not since.
    /// A std Mutex: held for two field writes, never across an await.
    last_warn: Mutex<(Option<Instant>, u64)>,
}

// === impl Upstream ===

impl Upstream {
    /// A pooled client for `url` (HTTP/2 with prior knowledge for `h2c://`).
    pub fn new(url: UpstreamUrl) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_max_idle_per_host(UPSTREAM_POOL_IDLE);
        if url.is_h2c() {
            builder.http2_only(true);
        }
        let authority: Option<Authority> = url.authority().parse().ok();
        let host = authority
            .as_ref()
            .filter(|_| !url.is_h2c())
            .and_then(|a| match a.port_u16() {
                Some(port) if port != 80 => {
                    HeaderValue::from_str(&format!("{}:{port}", a.host())).ok()
                }
                _ => HeaderValue::from_str(a.host()).ok(),
            });
        Upstream {
            client: builder.build(connector),
            url,
            authority,
            host,
            last_warn: Mutex::new((None, 0)),
        }
    }

    /// The service's URI for `path_and_query` (the host-local path and query the relay
    /// sent): put together from parsed parts when the service has no prefix path, else
    /// written out and parsed.
    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, Failure> {
        if let (Some(authority), Some(path_and_query), "") =
            (&self.authority, path_and_query, self.url.prefix())
            && path_and_query.as_str().starts_with('/')
        {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority.clone());
            parts.path_and_query = Some(path_and_query.clone());
            if let Ok(uri) = Uri::from_parts(parts) {
                return Ok(uri);
            }
        }
        let path = path_and_query.map_or("/", PathAndQuery::as_str);
        self.url
            .http_url(path)
            .parse()
            .map_err(|_| Failure::BadRequest("invalid path"))
    }

    /// The local service's base URL.
    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// Sends one request to the service: `request` carries the host-local path and query
    /// as its URI and the headers the relay sent. The response head must come within
    /// [`UPSTREAM_TIMEOUT`] of the request body's end; the body then streams.
    ///
    /// # Errors
    /// See [`Failure`]; failures are logged (rate limited) here.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, Failure> {
        let (parts, body) = request.into_parts();
        let uri = self.uri(parts.uri.path_and_query())?;
        let mut out = Request::new(Body::empty());
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = headers::to_upstream(parts.headers);
        if let Some(host) = &self.host {
            out.headers_mut().insert(header::HOST, host.clone());
        }
        // The tunnel carries trailers whatever the client speaks (the relay drops them
        // for an HTTP/1.1 client that did not ask), so ask the service for them: an
        // HTTP/1.1 service sends trailers only to a client that says it takes them.
        out.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
        let (body, ended) = crate::body::watch_end(body);
        *out.body_mut() = body;
        let deadline = async {
            let _ = ended.await;
            tokio::time::sleep(UPSTREAM_TIMEOUT).await;
        };
        let result = tokio::select! {
            result = self.client.request(out) => result
                .map_err(|e| Failure::Unavailable(super::error_chain(&e))),
            () = deadline => Err(Failure::TimedOut),
        };
        result.inspect_err(|failure| self.warn_failure(failure, Answered::BadGateway))
    }

    /// Opens a WebSocket on the service: an HTTP/1.1 upgrade of `path_and_query` with
    /// `headers` (the client's subprotocols among them), the handshake checked
    /// (RFC 6455 §4.1). Extensions are not offered, so frames pass through unchanged.
    ///
    /// # Errors
    /// See [`Failure`].
    pub async fn upgrade(
        &self,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Upgrade, Failure> {
        let result = timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            self.upgrade_inner(path_and_query, headers),
        )
        .await
        .unwrap_or(Err(Failure::TimedOut));
        result.inspect_err(|failure| self.warn_failure(failure, Answered::BadGateway))
    }

    async fn upgrade_inner(
        &self,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Upgrade, Failure> {
        use tokio_tungstenite::tungstenite::handshake::client::generate_key;
        use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

        let unavailable = |e: &dyn std::error::Error| Failure::Unavailable(super::error_chain(e));
        let stream = TcpStream::connect(self.url.authority())
            .await
            .map_err(|e| unavailable(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(&e))?;
        tokio::spawn(async move {
            // Ends with the upgrade (the stream moves to the channel) or the connection.
            let _ = conn.with_upgrades().await;
        });
        let key = generate_key();
        let uri: http::Uri = self
            .url
            .http_url(path_and_query)
            .parse()
            .map_err(|_| Failure::BadRequest("invalid path"))?;
        let mut request = Request::new(Body::empty());
        *request.method_mut() = Method::GET;
        *request.headers_mut() = headers::to_upstream(headers.clone());
        let host = HeaderValue::from_str(self.url.authority())
            .map_err(|_| Failure::BadRequest("invalid upstream authority"))?;
        let set = request.headers_mut();
        set.insert(header::HOST, host);
        set.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        set.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        set.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        let key_value =
            HeaderValue::from_str(&key).map_err(|_| Failure::BadRequest("invalid key"))?;
        set.insert(header::SEC_WEBSOCKET_KEY, key_value);
        *request.uri_mut() = uri
            .path_and_query()
            .map_or_else(|| "/".parse(), |p| p.as_str().parse())
            .map_err(|_| Failure::BadRequest("invalid path"))?;
        let mut response = send
            .send_request(request)
            .await
            .map_err(|e| unavailable(&e))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut head, body) = response.into_parts();
            headers::from_upstream(&mut head.headers);
            let body = Body::new(http_body_util::Limited::new(body, UPSTREAM_WS_REFUSAL_BODY));
            return Ok(Upgrade::Refused(Response::from_parts(head, body)));
        }
        let accepted = response
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == derive_accept_key(key.as_bytes()).as_bytes());
        let extensions = response
            .headers()
            .contains_key(header::SEC_WEBSOCKET_EXTENSIONS);
        if !accepted || extensions {
            return Err(Failure::Unavailable(
                "the local WebSocket handshake is invalid (accept key or unrequested extension)"
                    .into(),
            ));
        }
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| unavailable(&e))?;
        let (head, _) = response.into_parts();
        Ok(Upgrade::Open(LocalWebSocket {
            io: TokioIo::new(upgraded),
            response: Response::from_parts(head, ()),
        }))
    }

    /// Logs a request or WebSocket the service failed, at WARN at most once per
    /// `WARN_INTERVAL` (with how many were not logged since), else at DEBUG.
    pub fn warn_failure(&self, failure: &Failure, answered: Answered) {
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
                warn!(upstream = %self.url, error = %failure, suppressed, "upstream request failed; {}", answered.what());
            }
            None => {
                debug!(upstream = %self.url, error = %failure, "upstream request failed; {}", answered.what());
            }
        }
    }
}

/// What the client was given for a request the service failed.
#[derive(Debug, Clone, Copy)]
pub enum Answered {
    /// A 502 (HTTP, and h2's WebSocket upgrades).
    BadGateway,
    /// A v1 channel, already open, closed with 1011 (v1 cannot refuse one).
    ChannelClosed,
}

impl Answered {
    fn what(self) -> &'static str {
        match self {
            Answered::BadGateway => "answered 502",
            Answered::ChannelClosed => "WebSocket channel closed 1011",
        }
    }
}

/// `bytes` as a body.
pub fn body_of(bytes: Bytes) -> Body {
    Body::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_failure_not_an_error_of_the_tunnel() {
        // A port that was just free: the connection is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let up = Upstream::new(UpstreamUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap());
        let request = Request::builder().uri("/x").body(Body::empty()).unwrap();
        let failure = up.send(request).await.unwrap_err();
        assert!(matches!(failure, Failure::Unavailable(_)), "{failure:?}");
        assert_eq!(failure.response().status(), StatusCode::BAD_GATEWAY);
        let refused = up.upgrade("/ws", &HeaderMap::new()).await;
        assert!(matches!(refused, Err(Failure::Unavailable(_))));
    }

    /// What the URI built from parts replaced: the base URL written out with the path,
    /// then parsed.
    fn written_out(up: &Upstream, uri: &str) -> Uri {
        let uri: Uri = uri.parse().unwrap();
        let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        up.url.http_url(path).parse().unwrap()
    }

    #[test]
    fn the_upstream_uri_built_from_parts_is_the_one_written_out() {
        let bases = [
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:3000",
            "http://127.0.0.1:8080/api",
            "h2c://127.0.0.1:50051",
        ];
        let paths = [
            "/",
            "/x",
            "/a/b?c=d&e",
            "//double",
            "/%2F?q=%20",
            "http://tunnel/from/h2?x=1",
            "*",
        ];
        for base in bases {
            let up = Upstream::new(UpstreamUrl::parse(base).unwrap());
            for path in paths {
                let request: Uri = path.parse().unwrap();
                let built = up.uri(request.path_and_query()).unwrap();
                assert_eq!(built, written_out(&up, path), "{base} + {path}");
                assert_eq!(built.to_string(), written_out(&up, path).to_string());
            }
        }
    }

    #[test]
    fn the_host_header_is_the_one_hyper_util_would_write() {
        let host = |base: &str| {
            Upstream::new(UpstreamUrl::parse(base).unwrap())
                .host
                .map(|h| h.to_str().unwrap().to_owned())
        };
        assert_eq!(
            host("http://127.0.0.1:8080").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(host("http://localhost:80/x").as_deref(), Some("localhost"));
        assert_eq!(host("http://localhost").as_deref(), Some("localhost"));
        assert_eq!(host("http://[::1]:3000").as_deref(), Some("[::1]:3000"));
        // HTTP/2 names the authority in `:authority`.
        assert_eq!(host("h2c://127.0.0.1:50051"), None);
    }
}
