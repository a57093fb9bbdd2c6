//! The HTTP requests the relay makes itself (an identity provider's key set, the access
//! check): one GET on a fresh connection, HTTP or HTTPS (rustls: the web's roots, and
//! the CAs of `--fetch-ca-file`), bounded in time and size.
//!
//! Rare by design (the answers are cached by their users), so no pool.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Why a GET got no answer. The other side's fault (or the network's), never the
/// caller's.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL cannot be fetched (not http/https, no host).
    #[error("unusable URL: {0}")]
    BadUrl(&'static str),
    /// Connecting, TLS, or the exchange failed.
    #[error("{0}")]
    Failed(String),
    /// No whole answer within the time allowed.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The answer's body is larger than allowed.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// A byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// GETs `url` (with `bearer` as `Authorization: Bearer`), answering with the status and
/// at most `limit` bytes of body, all within `timeout`.
///
/// # Errors
/// See [`FetchError`].
pub async fn get(
    url: &Uri,
    bearer: Option<&str>,
    limit: usize,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), FetchError> {
    tokio::time::timeout(timeout, get_inner(url, bearer, limit))
        .await
        .unwrap_or(Err(FetchError::TimedOut(timeout)))
}

async fn get_inner(
    url: &Uri,
    bearer: Option<&str>,
    limit: usize,
) -> Result<(StatusCode, Bytes), FetchError> {
    let tls = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(FetchError::BadUrl("the scheme must be http or https")),
    };
    let host = url.host().ok_or(FetchError::BadUrl("no host"))?;
    let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let failed =
        |what: &str, err: &dyn std::fmt::Display| FetchError::Failed(format!("{what}: {err}"));
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| failed("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        let name = rustls_pki_types::ServerName::try_from(bare_host.to_owned())
            .map_err(|_| FetchError::BadUrl("the host is not a valid TLS server name"))?;
        let stream = tokio_rustls::TlsConnector::from(tls_config())
            .connect(name, tcp)
            .await
            .map_err(|e| failed("TLS", &e))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed("HTTP", &e))?;
    // Ends when the answer is read and `send` dropped.
    let conn = tokio::spawn(conn);
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| FetchError::BadUrl("unusable path"))?;
    let authority = url.authority().map_or(host, |a| a.as_str());
    let headers = request.headers_mut();
    headers.insert(
        header::HOST,
        HeaderValue::from_str(authority).map_err(|_| FetchError::BadUrl("unusable host"))?,
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("relay/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(bearer) = bearer {
        let mut value = HeaderValue::from_str(&format!("Bearer {bearer}"))
            .map_err(|_| FetchError::BadUrl("the token cannot be sent in a header"))?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    let response = send
        .send_request(request)
        .await
        .map_err(|e| failed("HTTP", &e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge(limit)
            } else {
                failed("reading the answer", &e)
            }
        })?
        .to_bytes();
    drop(send);
    conn.abort();
    Ok((status, body))
}

/// CAs trusted besides the web's roots (PEM), set once at startup ([`trust`]).
static EXTRA_ROOTS: OnceLock<Vec<u8>> = OnceLock::new();

/// Trusts the CA certificates of `pem` (checked by the configuration) for every HTTPS
/// request from now on, besides the web's roots. Call it once, at startup, before the
/// first request; later calls change nothing.
pub fn trust(pem: &[u8]) {
    let _ = EXTRA_ROOTS.set(pem.to_vec());
}

/// Built once: the web's roots and those of [`trust`] ([`crate::tls::client_config`]).
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| crate::tls::client_config(EXTRA_ROOTS.get().map_or(&[], Vec::as_slice)))
        .clone()
}
