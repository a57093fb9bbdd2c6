//! A bulk-data upstream: a real HTTP server on `127.0.0.1:0` that speaks
//! HTTP/1.1 and h2c (HTTP/2 with prior knowledge) on the same port, for tests
//! that push large bodies through the tunnel and check them byte for byte.
//!
//! Bodies are never kept: downloads are generated from a seed by
//! [`Pattern`], a fast deterministic generator, so a test checks what arrived
//! against [`expected_sha256`] instead of holding gigabytes; uploads are hashed
//! as they stream in.
//!
//! Routes (any prefix before them is an error, as the relay strips
//! `/hosts/<hostId>`):
//! - `GET /bytes?n=<len>&seed=<u64>`: `n` bytes of `Pattern::new(seed)`
//!   (default seed 0), in 64 KiB chunks, chunked (no `content-length`) unless
//!   `&length=1`; `&rate=<bytes/s>` paces it. Each download is recorded
//!   ([`DownloadRecord`]): completed, or aborted when the peer went away
//!   mid-body, which is how a test proves cancellation reached the upstream
//!   ([`BulkUpstream::wait_for_aborted_download`]).
//! - `/upload` (any method with a body): hashes the body as it streams and
//!   answers `{"bytes": n, "sha256": "<hex>"}`; recorded as [`UploadRecord`].
//! - `GET /sse?events=N&interval_ms=M`: `text/event-stream`, one event every
//!   `M` ms (the first at once), each its own chunk; the instant each event is
//!   handed to the connection is recorded ([`SseRecord`]), so a test can
//!   compute first-event latency at its client.
//! - `GET /trailers?chunks=N`: a chunked body of `N` (default 3) lines followed
//!   by the trailers `x-checksum` (SHA-256 hex of the body) and `x-chunks`.
//!   h2c clients always get them; HTTP/1.1 clients only when they sent
//!   `TE: trailers` (hyper's rule, and RFC 9110's).
//!
//! Every request's method, path and HTTP version is recorded
//! ([`BulkUpstream::requests`]), so a test can tell whether h2c was used.
//!
//! The recordings use [`std::time::Instant`] rather than tokio's: they are
//! compared with instants taken by the clients in
//! [`stream_client`](crate::stream_client), on real time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, TRAILER};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The size of the chunks `/bytes` sends and [`expected_sha256`] hashes:
/// large enough that per-chunk overhead is noise, small enough to be a
/// handful of TCP segments.
pub const CHUNK_LEN: usize = 64 * 1024;

/// Pause after a failed `accept` (out of file descriptors, typically).
pub(crate) const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Slowest pace at which `/bytes?rate=` sends a chunk: with low rates the
/// chunks shrink so that a chunk goes out at least this often and the pace
/// stays smooth.
const PACED_CHUNKS_PER_SECOND: u64 = 50;

// === Pattern ===

/// The generator of every body here; see its crate for why it lives apart.
pub use relay_test_pattern::Pattern;

/// The next `len` bytes of `pattern` as a new buffer.
pub fn pattern_bytes(pattern: &mut Pattern, len: usize) -> Bytes {
    let mut buf = BytesMut::zeroed(len);
    pattern.fill(&mut buf);
    buf.freeze()
}

/// The lowercase hex SHA-256 of the first `n` bytes of `Pattern::new(seed)`,
/// what a correct `/bytes?n=<n>&seed=<seed>` download or a
/// [`upload`](crate::stream_client::upload) of `n` bytes with `seed` hashes
/// to.
pub fn expected_sha256(n: u64, seed: u64) -> String {
    let mut pattern = Pattern::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut left = n;
    while left > 0 {
        let len = usize::try_from(left).map_or(CHUNK_LEN, |left| left.min(CHUNK_LEN));
        pattern.fill(&mut buf[..len]);
        hasher.update(&buf[..len]);
        left -= len as u64;
    }
    hex(&hasher.finalize())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
        out
    })
}

// === recordings ===

/// How a `/bytes` download ended, as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadOutcome {
    /// Still sending.
    InProgress,
    /// The last byte was handed to the connection. (A peer that goes away
    /// after that is not noticed: the body is done.)
    Completed,
    /// The body was dropped before its last byte: the client (or whatever
    /// carried it) went away mid-body.
    Aborted,
}

/// One `/bytes` request.
#[derive(Debug, Clone)]
pub struct DownloadRecord {
    /// The `n` asked for.
    pub n: u64,
    /// The seed.
    pub seed: u64,
    /// Bytes handed to the connection so far.
    pub sent: u64,
    /// How it ended.
    pub outcome: DownloadOutcome,
    /// The HTTP version it was requested over.
    pub version: Version,
}

/// One `/upload` request.
#[derive(Debug, Clone)]
pub struct UploadRecord {
    /// Body bytes received.
    pub bytes: u64,
    /// SHA-256 hex of the whole body, once it ended cleanly.
    pub sha256: Option<String>,
    /// `Some(error)` when the body broke off (the client went away).
    pub error: Option<String>,
}

/// One `/sse` request.
#[derive(Debug, Clone)]
pub struct SseRecord {
    /// When each event was handed to the connection, in order.
    pub sent_at: Vec<Instant>,
    /// Whether all the events asked for were sent.
    pub finished: bool,
}

/// One request of any route.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Its method.
    pub method: Method,
    /// Its path and query, as received.
    pub path_and_query: String,
    /// HTTP/1.1 or HTTP/2.
    pub version: Version,
    /// Its headers.
    pub headers: HeaderMap,
}

/// Everything the handlers record. A std mutex: only held to push or copy,
/// never across an await.
#[derive(Default)]
struct Recordings {
    requests: Vec<RequestRecord>,
    downloads: Vec<DownloadRecord>,
    uploads: Vec<UploadRecord>,
    sse: Vec<SseRecord>,
}

/// State shared by the handlers and the [`BulkUpstream`] handle.
struct BulkState {
    recordings: Mutex<Recordings>,
    /// Bumped after every change of `recordings`, so waiters re-check their
    /// condition when something happened instead of polling on a timer.
    changed: watch::Sender<u64>,
}

// === impl BulkState ===

impl BulkState {
    /// Applies `f` to the recordings, then wakes the waiters.
    fn record<T>(&self, f: impl FnOnce(&mut Recordings) -> T) -> T {
        let out = f(&mut self.recordings.lock().expect("recordings poisoned"));
        self.changed.send_modify(|version| *version += 1);
        out
    }
}

// === BulkUpstream ===

/// The running server. Dropping it stops accepting and closes every
/// connection (their tasks live in the accept task's [`JoinSet`]).
pub struct BulkUpstream {
    addr: SocketAddr,
    state: Arc<BulkState>,
    task: JoinHandle<()>,
}

// === impl BulkUpstream ===

impl BulkUpstream {
    /// Binds `127.0.0.1:0` and serves HTTP/1.1 and h2c in a background task.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn spawn() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the bulk upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("bulk upstream local addr");
        let state = Arc::new(BulkState {
            recordings: Mutex::default(),
            changed: watch::channel(0).0,
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Self { addr, state, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path_and_query}`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    fn recordings<T>(&self, f: impl FnOnce(&Recordings) -> T) -> T {
        f(&self.state.recordings.lock().expect("recordings poisoned"))
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.recordings(|r| r.requests.clone())
    }

    /// Every `/bytes` download so far, in arrival order.
    pub fn downloads(&self) -> Vec<DownloadRecord> {
        self.recordings(|r| r.downloads.clone())
    }

    /// How many downloads ended with `outcome` (or are in progress).
    pub fn download_count(&self, outcome: DownloadOutcome) -> usize {
        self.recordings(|r| r.downloads.iter().filter(|d| d.outcome == outcome).count())
    }

    /// Every `/upload` so far, in arrival order.
    pub fn uploads(&self) -> Vec<UploadRecord> {
        self.recordings(|r| r.uploads.clone())
    }

    /// Every `/sse` stream so far, in arrival order.
    pub fn sse_streams(&self) -> Vec<SseRecord> {
        self.recordings(|r| r.sse.clone())
    }

    /// Waits until `cond` holds for the recordings and returns what `cond`
    /// returned.
    ///
    /// # Panics
    ///
    /// If it does not within `timeout`; the message names `what`.
    async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Recordings) -> Option<T>,
    ) -> T {
        let mut changed = self.state.changed.subscribe();
        let wait = async {
            loop {
                // Marks the current version seen before checking, so a change
                // between the check and `changed()` still wakes us.
                changed.borrow_and_update();
                if let Some(found) = self.recordings(&mut cond) {
                    return found;
                }
                changed
                    .changed()
                    .await
                    .expect("the sender lives as long as the upstream");
            }
        };
        crate::wait::within(what, timeout, wait).await
    }

    /// Waits until a download was aborted by its peer and returns it.
    ///
    /// # Panics
    ///
    /// If none is within `timeout`.
    pub async fn wait_for_aborted_download(&self, timeout: Duration) -> DownloadRecord {
        self.wait_for("a download aborted by its peer", timeout, |r| {
            r.downloads
                .iter()
                .find(|d| d.outcome == DownloadOutcome::Aborted)
                .cloned()
        })
        .await
    }

    /// Waits until `n` downloads have ended (completed or aborted) and
    /// returns all downloads.
    ///
    /// # Panics
    ///
    /// If they have not within `timeout`.
    pub async fn wait_for_downloads_ended(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<DownloadRecord> {
        self.wait_for(&format!("{n} download(s) ended"), timeout, |r| {
            let ended = r
                .downloads
                .iter()
                .filter(|d| d.outcome != DownloadOutcome::InProgress)
                .count();
            (ended >= n).then(|| r.downloads.clone())
        })
        .await
    }

    /// Waits until `n` uploads have ended (cleanly or not) and returns them.
    ///
    /// # Panics
    ///
    /// If they have not within `timeout`.
    pub async fn wait_for_uploads(&self, n: usize, timeout: Duration) -> Vec<UploadRecord> {
        self.wait_for(&format!("{n} upload(s) ended"), timeout, |r| {
            (r.uploads.len() >= n).then(|| r.uploads.clone())
        })
        .await
    }
}

impl Drop for BulkUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; aborting it drops `connections`, which
/// aborts every connection task.
async fn accept_loop(listener: TcpListener, state: Arc<BulkState>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // E.g. EMFILE under a test opening many sockets: keep serving once
            // descriptors free up, without spinning on the error meanwhile.
            Err(_) => {
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        // Streamed chunks go out as soon as they are written.
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            // HTTP/1.1, or HTTP/2 when the client opens with the h2 preface.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

/// Response body type of every route.
type BulkBody = UnsyncBoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<BulkBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp
}

/// Dispatches one request.
async fn handle(
    state: Arc<BulkState>,
    req: Request<Incoming>,
) -> Result<Response<BulkBody>, Infallible> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    state.record(|r| {
        r.requests.push(RequestRecord {
            method: req.method().clone(),
            path_and_query,
            version: req.version(),
            headers: req.headers().clone(),
        });
    });
    let params = match query_params(req.uri()) {
        Ok(params) => params,
        Err(err) => return Ok(text(StatusCode::BAD_REQUEST, err)),
    };
    let resp = match req.uri().path() {
        "/bytes" => bytes_route(&state, &params, req.version()),
        "/upload" => Ok(upload_route(&state, req.into_body()).await),
        "/sse" => sse_route(&state, &params),
        "/trailers" => trailers_route(&params),
        other => Ok(text(
            StatusCode::NOT_FOUND,
            format!("no route {other} on the bulk upstream\n"),
        )),
    };
    Ok(resp.unwrap_or_else(|err| text(StatusCode::BAD_REQUEST, err)))
}

/// Numeric query parameters (`name=value` pairs; values must be `u64`).
type Params = HashMap<String, u64>;

fn query_params(uri: &Uri) -> Result<Params, String> {
    let mut params = Params::new();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value
            .parse()
            .map_err(|_| format!("query parameter {name}={value:?} is not a u64\n"))?;
        params.insert(name.to_owned(), value);
    }
    Ok(params)
}

fn required(params: &Params, name: &str) -> Result<u64, String> {
    params
        .get(name)
        .copied()
        .ok_or_else(|| format!("missing query parameter {name}\n"))
}

// === /bytes ===

fn bytes_route(
    state: &Arc<BulkState>,
    params: &Params,
    version: Version,
) -> Result<Response<BulkBody>, String> {
    let n = required(params, "n")?;
    let seed = params.get("seed").copied().unwrap_or(0);
    let rate = match params.get("rate") {
        Some(0) => return Err("rate must be positive\n".to_owned()),
        rate => rate.copied(),
    };
    let index = state.record(|r| {
        r.downloads.push(DownloadRecord {
            n,
            seed,
            sent: 0,
            outcome: if n == 0 {
                DownloadOutcome::Completed
            } else {
                DownloadOutcome::InProgress
            },
            version,
        });
        r.downloads.len() - 1
    });
    let chunk_len = match rate {
        Some(rate) => usize::try_from(rate / PACED_CHUNKS_PER_SECOND)
            .unwrap_or(CHUNK_LEN)
            .clamp(1, CHUNK_LEN),
        None => CHUNK_LEN,
    };
    let body = PatternBody {
        pattern: Pattern::new(seed),
        left: n,
        sent: 0,
        chunk_len,
        pace: rate.map(|rate| Pace {
            rate,
            started: tokio::time::Instant::now(),
            sleep: None,
        }),
        state: state.clone(),
        index,
        announce_length: params.get("length") == Some(&1),
    };
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if params.get("length") == Some(&1) {
        resp.headers_mut().insert(CONTENT_LENGTH, n.into());
    }
    Ok(resp)
}

/// Pacing of a rate-limited download.
struct Pace {
    rate: u64,
    started: tokio::time::Instant,
    /// Set while waiting for the next chunk's turn.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The body of `/bytes`: generates chunks as the connection asks for them,
/// so a slow reader holds back the generator (backpressure) instead of
/// buffering, and records its progress and fate.
struct PatternBody {
    pattern: Pattern,
    left: u64,
    sent: u64,
    chunk_len: usize,
    pace: Option<Pace>,
    state: Arc<BulkState>,
    /// Index of its [`DownloadRecord`].
    index: usize,
    /// With `length=1` the size is exact, which is what makes hyper send a
    /// `content-length` framing instead of chunks.
    announce_length: bool,
}

// === impl PatternBody ===

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let sent = self.sent;
        if let Some(pace) = &mut self.pace {
            // Chunk k may leave once the bytes before it fit the rate.
            let due = pace.started + Duration::from_secs_f64(sent as f64 / pace.rate as f64);
            if tokio::time::Instant::now() < due {
                let sleep = pace
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                sleep.as_mut().reset(due);
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
        let len =
            usize::try_from(self.left).map_or(self.chunk_len, |left| left.min(self.chunk_len));
        let chunk = pattern_bytes(&mut self.pattern, len);
        self.left -= len as u64;
        self.sent += len as u64;
        let (index, sent, done) = (self.index, self.sent, self.left == 0);
        self.state.record(|r| {
            let record = &mut r.downloads[index];
            record.sent = sent;
            if done {
                record.outcome = DownloadOutcome::Completed;
            }
        });
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.announce_length {
            SizeHint::with_exact(self.left)
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for PatternBody {
    fn drop(&mut self) {
        if self.left > 0 {
            let index = self.index;
            self.state.record(|r| {
                r.downloads[index].outcome = DownloadOutcome::Aborted;
            });
        }
    }
}

// === /upload ===

async fn upload_route(state: &BulkState, mut body: Incoming) -> Response<BulkBody> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    // Frame by frame: never more than one frame in memory.
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    bytes += data.len() as u64;
                }
            }
            Err(err) => {
                state.record(|r| {
                    r.uploads.push(UploadRecord {
                        bytes,
                        sha256: None,
                        error: Some(err.to_string()),
                    });
                });
                return text(StatusCode::BAD_REQUEST, format!("body broke off: {err}\n"));
            }
        }
    }
    let sha256 = hex(&hasher.finalize());
    state.record(|r| {
        r.uploads.push(UploadRecord {
            bytes,
            sha256: Some(sha256.clone()),
            error: None,
        });
    });
    let mut resp = text(
        StatusCode::OK,
        json!({ "bytes": bytes, "sha256": sha256 }).to_string(),
    );
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

// === /sse ===

fn sse_route(state: &Arc<BulkState>, params: &Params) -> Result<Response<BulkBody>, String> {
    let events = required(params, "events")?;
    let interval = Duration::from_millis(params.get("interval_ms").copied().unwrap_or(0));
    let index = state.record(|r| {
        r.sse.push(SseRecord {
            sent_at: Vec::new(),
            finished: events == 0,
        });
        r.sse.len() - 1
    });
    let body = SseBody {
        events,
        next: 0,
        interval,
        next_due: tokio::time::Instant::now(),
        sleep: None,
        state: state.clone(),
        index,
    };
    let mut resp = Response::new(body.boxed_unsync());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// The body of `/sse`: one event per frame, each due `interval` after the
/// previous one. hyper flushes whenever the body is pending, so each event
/// leaves in its own write.
struct SseBody {
    events: u64,
    next: u64,
    interval: Duration,
    next_due: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    state: Arc<BulkState>,
    /// Index of its [`SseRecord`].
    index: usize,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.next == self.events {
            return Poll::Ready(None);
        }
        let due = self.next_due;
        if tokio::time::Instant::now() < due {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            sleep.as_mut().reset(due);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let seq = self.next;
        self.next += 1;
        self.next_due = due + self.interval;
        let event = Bytes::from(format!("id: {seq}\nevent: tick\ndata: event {seq}\n\n"));
        let (index, finished) = (self.index, self.next == self.events);
        self.state.record(|r| {
            let record = &mut r.sse[index];
            record.sent_at.push(Instant::now());
            record.finished = finished;
        });
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        self.next == self.events
    }
}

// === /trailers ===

/// The body lines of `/trailers?chunks=N`.
pub fn trailers_body_chunks(chunks: u64) -> Vec<Bytes> {
    (0..chunks)
        .map(|i| Bytes::from(format!("chunk {i}\n")))
        .collect()
}

fn trailers_route(params: &Params) -> Result<Response<BulkBody>, String> {
    let chunks = trailers_body_chunks(params.get("chunks").copied().unwrap_or(3));
    let mut hasher = Sha256::new();
    for chunk in &chunks {
        hasher.update(chunk);
    }
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "x-checksum",
        hex(&hasher.finalize())
            .parse()
            .expect("hex is a valid header value"),
    );
    trailers.insert("x-chunks", chunks.len().into());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .into_iter()
        .map(Frame::data)
        .chain(std::iter::once(Frame::trailers(trailers)))
        .map(Ok)
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut resp = Response::new(body.boxed_unsync());
    // HTTP/1.1 sends only the trailer fields announced here.
    resp.headers_mut()
        .insert(TRAILER, HeaderValue::from_static("x-checksum, x-chunks"));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEADLINE;
    use crate::stream_client::{DownloadOptions, Protocol, UploadOptions, download, upload};

    const PROTOCOLS: [Protocol; 2] = [Protocol::Http1, Protocol::H2c];

    fn version_of(protocol: Protocol) -> Version {
        match protocol {
            Protocol::Http1 => Version::HTTP_11,
            Protocol::H2c => Version::HTTP_2,
        }
    }

    #[test]
    fn expected_sha256_hashes_the_pattern() {
        // Empty input: the well-known SHA-256 of nothing.
        assert_eq!(
            expected_sha256(0, 9),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Across chunk boundaries and with a ragged tail.
        let n = 3 * CHUNK_LEN + 5;
        let bytes = pattern_bytes(&mut Pattern::new(9), n);
        assert_eq!(expected_sha256(n as u64, 9), hex(&Sha256::digest(&bytes)));
        assert_ne!(expected_sha256(n as u64, 9), expected_sha256(n as u64, 10));
    }

    /// How fast a download can be checked: generating and hashing, both
    /// compiled optimized even in debug builds (the workspace's profile
    /// overrides). `cargo test -- --nocapture` prints it. The floor is far
    /// below what it measures (well over 1 GB/s), yet above what either step
    /// manages unoptimized (under 100 MB/s), so losing an override fails.
    #[test]
    fn checking_a_download_is_not_the_bottleneck() {
        const TOTAL: u64 = 512 * 1024 * 1024;
        let started = Instant::now();
        std::hint::black_box(expected_sha256(TOTAL, 1));
        let rate = TOTAL as f64 / started.elapsed().as_secs_f64();
        eprintln!("pattern + SHA-256: {:.0} MB/s", rate / 1e6);
        assert!(rate > 200e6, "{:.0} MB/s", rate / 1e6);
    }

    #[tokio::test]
    async fn bytes_streams_the_pattern_chunked_or_with_a_length() {
        let upstream = BulkUpstream::spawn().await;
        for protocol in PROTOCOLS {
            for length in [false, true] {
                let n = 8 * 1024 * 1024 + 3;
                let url = upstream.url(&format!(
                    "/bytes?n={n}&seed=5{}",
                    if length { "&length=1" } else { "" }
                ));
                let got = download(&url, &[], DownloadOptions::default().protocol(protocol))
                    .await
                    .expect("download");
                assert_eq!(got.status, StatusCode::OK);
                assert_eq!(got.version, version_of(protocol));
                assert_eq!(got.bytes, n);
                assert_eq!(got.sha256, expected_sha256(n, 5), "{protocol:?}");
                assert!(got.body_error.is_none(), "{:?}", got.body_error);
                let expected_length = length.then(|| n.to_string());
                assert_eq!(
                    got.header("content-length").map(str::to_owned),
                    expected_length,
                    "{protocol:?}, length={length}"
                );
                if protocol == Protocol::Http1 && !length {
                    assert_eq!(got.header("transfer-encoding"), Some("chunked"));
                }
            }
        }
        let downloads = upstream.wait_for_downloads_ended(4, DEADLINE).await;
        assert!(
            downloads
                .iter()
                .all(|d| d.outcome == DownloadOutcome::Completed && d.sent == d.n),
            "{downloads:?}"
        );
        let versions: Vec<Version> = upstream.requests().iter().map(|r| r.version).collect();
        assert_eq!(
            versions,
            [
                Version::HTTP_11,
                Version::HTTP_11,
                Version::HTTP_2,
                Version::HTTP_2
            ]
        );
    }

    #[tokio::test]
    async fn bad_parameters_and_unknown_routes_are_refused() {
        let upstream = BulkUpstream::spawn().await;
        for (path, status) in [
            ("/bytes", StatusCode::BAD_REQUEST),
            ("/bytes?n=ten", StatusCode::BAD_REQUEST),
            ("/bytes?n=10&rate=0", StatusCode::BAD_REQUEST),
            ("/sse", StatusCode::BAD_REQUEST),
            ("/hosts/h/bytes?n=1", StatusCode::NOT_FOUND),
        ] {
            let got = download(&upstream.url(path), &[], DownloadOptions::default())
                .await
                .expect("download");
            assert_eq!(got.status, status, "{path}");
        }
    }

    #[tokio::test]
    async fn rate_paces_a_download() {
        let upstream = BulkUpstream::spawn().await;
        // 300 kB at 1 MB/s: the last chunk may not leave before 0.3 s minus
        // one chunk's share (20 ms).
        let url = upstream.url("/bytes?n=300000&seed=1&rate=1000000");
        let got = download(&url, &[], DownloadOptions::default())
            .await
            .expect("download");
        assert_eq!(got.sha256, expected_sha256(300_000, 1));
        assert!(
            got.finished_after >= Duration::from_millis(270),
            "paced download took only {:?}",
            got.finished_after
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_away_mid_body_is_recorded_as_an_abort() {
        for protocol in PROTOCOLS {
            let upstream = BulkUpstream::spawn().await;
            let n = 1u64 << 40; // a terabyte: it can only end by an abort
            let url = upstream.url(&format!("/bytes?n={n}&seed=3"));
            let got = download(
                &url,
                &[],
                DownloadOptions::default()
                    .protocol(protocol)
                    .abort_after(1 << 20),
            )
            .await
            .expect("download");
            assert!(got.aborted);
            assert_eq!(got.bytes, 1 << 20);
            // The prefix is still byte-exact.
            assert_eq!(got.sha256, expected_sha256(1 << 20, 3));
            let record = upstream.wait_for_aborted_download(DEADLINE).await;
            assert_eq!(record.outcome, DownloadOutcome::Aborted, "{protocol:?}");
            assert!(record.sent >= 1 << 20 && record.sent < n, "{record:?}");
            assert_eq!(record.version, version_of(protocol));
            assert_eq!(upstream.download_count(DownloadOutcome::Completed), 0);
        }
    }

    #[tokio::test]
    async fn upload_is_hashed_as_it_streams() {
        let upstream = BulkUpstream::spawn().await;
        let n = 16 * 1024 * 1024 + 11;
        for (i, protocol) in PROTOCOLS.into_iter().enumerate() {
            let got = upload(
                &upstream.url("/upload"),
                &[("x-test", "upload")],
                n,
                7,
                UploadOptions::default().protocol(protocol),
            )
            .await
            .expect("upload");
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(got.sent, n);
            let json = got.json().expect("JSON answer");
            assert_eq!(json["bytes"], n, "{protocol:?}");
            assert_eq!(json["sha256"], expected_sha256(n, 7), "{protocol:?}");
            let uploads = upstream.wait_for_uploads(i + 1, DEADLINE).await;
            assert_eq!(uploads[i].bytes, n);
            assert!(uploads[i].error.is_none());
        }
        // HTTP/1.1 streamed it chunked: no length was known in advance.
        let first = &upstream.requests()[0];
        assert_eq!(first.method, Method::POST);
        assert_eq!(
            first.headers.get("transfer-encoding").map(|v| v.as_bytes()),
            Some(&b"chunked"[..])
        );
    }

    #[tokio::test]
    async fn sse_sends_each_event_in_its_own_chunk_and_records_when() {
        for protocol in PROTOCOLS {
            let upstream = BulkUpstream::spawn().await;
            let got = download(
                &upstream.url("/sse?events=4&interval_ms=50"),
                &[],
                DownloadOptions::default()
                    .protocol(protocol)
                    .record_chunks()
                    .keep_body(4096),
            )
            .await
            .expect("download");
            assert_eq!(got.header("content-type"), Some("text/event-stream"));
            assert_eq!(got.text().matches("event: tick\n").count(), 4);
            assert!(got.text().ends_with("data: event 3\n\n"), "{}", got.text());
            // 50 ms apart, so never coalesced on the way.
            assert_eq!(got.chunks.len(), 4, "{protocol:?}: {:?}", got.chunks);
            let record = upstream.sse_streams().remove(0);
            assert!(record.finished);
            assert_eq!(record.sent_at.len(), 4);
            for (sent, arrived) in record.sent_at.iter().zip(&got.chunks) {
                assert!(arrived.at >= *sent, "an event arrived before it was sent");
            }
            let spread = record.sent_at[3] - record.sent_at[0];
            assert!(
                spread >= Duration::from_millis(150),
                "events sent {spread:?} apart"
            );
            let first_event_latency = got.chunks[0].at - record.sent_at[0];
            assert!(first_event_latency < DEADLINE, "{first_event_latency:?}");
        }
    }

    #[tokio::test]
    async fn trailers_follow_the_body() {
        let upstream = BulkUpstream::spawn().await;
        let url = upstream.url("/trailers?chunks=5");
        let body: Vec<u8> = trailers_body_chunks(5).concat();
        let checksum = hex(&Sha256::digest(&body));
        let asking = [("te", "trailers")];
        for (protocol, headers) in [
            (Protocol::H2c, &[][..]),
            (Protocol::Http1, &asking[..]),
            (Protocol::Http1, &[][..]),
        ] {
            let got = download(
                &url,
                headers,
                DownloadOptions::default()
                    .protocol(protocol)
                    .keep_body(1024),
            )
            .await
            .expect("download");
            assert_eq!(got.body, body);
            assert_eq!(got.sha256, checksum);
            if protocol == Protocol::Http1 && headers.is_empty() {
                // Without `TE: trailers` an HTTP/1.1 server must not send them.
                assert!(got.trailers.is_none(), "{:?}", got.trailers);
            } else {
                assert_eq!(
                    got.trailer("x-checksum"),
                    Some(checksum.as_str()),
                    "{protocol:?}"
                );
                assert_eq!(got.trailer("x-chunks"), Some("5"));
            }
        }
    }
}
