//! The local service behind the tunnel: a minimal hyper HTTP/1.1 server. Every request is
//! answered with the same small body, except three routes the tunnel comparison needs:
//!
//! - `GET /bytes/<n>`: `n` bytes of ASCII, streamed in 64 KiB chunks (bulk download);
//! - `POST /upload`: reads the whole body, whatever its size, and answers with the number
//!   of bytes it read (bulk upload);
//! - `GET /sse?delay_ms=<d>&hold_ms=<h>`: a `text/event-stream` whose one event is
//!   written `d` ms after the request; its data is the time of writing, in nanoseconds
//!   since [`Upstream::epoch`], so a client in the same process can tell how long the
//!   event took to reach it. The stream then stays open `h` ms more and ends, so that a
//!   tunnel that buffers whole responses still delivers it, late.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The body of every response: 64 bytes.
pub const BODY: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Size of each chunk of a `/bytes/<n>` body.
const CHUNK_LEN: usize = 64 * 1024;

/// What `/bytes/<n>` sends, chunk after chunk. ASCII on purpose: a v1 agent carries a
/// UTF-8 body as it is but any other as base64, and the comparison is of the tunnels, not
/// of base64.
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];

/// The SSE event's delay and how long the stream stays open after it, when the query
/// does not say.
const SSE_DELAY: Duration = Duration::from_millis(200);
const SSE_HOLD: Duration = Duration::from_millis(1_000);

/// The small answer stays a plain `Full` (no allocation for a box on the path every
/// request-rate figure goes through); the streamed ones are boxed.
type ResponseBody = Either<Full<Bytes>, UnsyncBoxBody<Bytes, Infallible>>;

/// A running upstream. Stops accepting when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The origin of the timestamps in SSE events.
    #[allow(dead_code, reason = "only the tunnel bench reads SSE timestamps")]
    pub epoch: Instant,
    accept: JoinHandle<()>,
}

impl Upstream {
    /// Starts the server on an ephemeral port of 127.0.0.1.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start() -> Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let epoch = Instant::now();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = service_fn(move |request| serve(request, epoch));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Upstream {
            addr,
            epoch,
            accept,
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn small() -> http::Response<ResponseBody> {
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Either::Left(Full::new(Bytes::from_static(BODY))))
        .expect("static response is valid")
}

fn text(status: u16, body: String) -> http::Response<ResponseBody> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Either::Left(Full::new(Bytes::from(body))))
        .expect("a text response is valid")
}

async fn serve(
    request: http::Request<Incoming>,
    epoch: Instant,
) -> Result<http::Response<ResponseBody>, Infallible> {
    let path = request.uri().path();
    // The small answer first: it is the hot path of the request-rate figures.
    if !path.starts_with("/bytes/") && path != "/upload" && path != "/sse" {
        return Ok(small());
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return Ok(text(400, format!("/bytes/<n>: {n:?} is not a number\n")));
        };
        return Ok(bytes(n));
    }
    if path == "/sse" {
        let query = request.uri().query().unwrap_or("");
        let delay = query_ms(query, "delay_ms").unwrap_or(SSE_DELAY);
        let hold = query_ms(query, "hold_ms").unwrap_or(SSE_HOLD);
        return Ok(sse(epoch, delay, hold));
    }
    // POST /upload: count what arrives without keeping it.
    let mut body = request.into_body();
    let mut read: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                }
            }
            Err(err) => return Ok(text(400, format!("reading the body: {err}\n"))),
        }
    }
    Ok(text(200, read.to_string()))
}

fn query_ms(query: &str, name: &str) -> Option<Duration> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

fn bytes(n: u64) -> http::Response<ResponseBody> {
    let chunks = stream::unfold(n, |left| async move {
        (left > 0).then(|| {
            let len = left.min(CHUNK_LEN as u64);
            let chunk = Bytes::from_static(&CHUNK[..len as usize]);
            (Ok::<_, Infallible>(Frame::data(chunk)), left - len)
        })
    });
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, n)
        .body(Either::Right(BodyExt::boxed_unsync(StreamBody::new(
            chunks,
        ))))
        .expect("a streamed response is valid")
}

fn sse(epoch: Instant, delay: Duration, hold: Duration) -> http::Response<ResponseBody> {
    // 0: wait, then write the event; 1: hold the stream open, then end it.
    let events = stream::unfold(0u8, move |step| async move {
        match step {
            0 => {
                tokio::time::sleep(delay).await;
                // Taken as late as possible: hyper writes the frame in the same poll.
                let written = epoch.elapsed().as_nanos();
                let event = Bytes::from(format!("data: {written}\n\n"));
                Some((Ok::<_, Infallible>(Frame::data(event)), 1))
            }
            _ => {
                tokio::time::sleep(hold).await;
                None
            }
        }
    });
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(Either::Right(BodyExt::boxed_unsync(StreamBody::new(
            events,
        ))))
        .expect("an event-stream response is valid")
}
