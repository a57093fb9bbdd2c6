//! gRPC over h2c without protoc: a tonic server on `127.0.0.1:0` and a
//! matching client, for tests that run gRPC through the tunnel.
//!
//! The service is written by hand against tonic's generic
//! [`tonic::server::Grpc`] / [`tonic::client::Grpc`], with a JSON
//! [`Codec`](tonic::codec::Codec) ([`JsonCodec`]) instead of protobuf: the
//! wire is still real gRPC (HTTP/2 POSTs, length-prefixed messages,
//! `grpc-status` in trailers), only the message bytes are JSON. So no
//! `.proto`, no build script, and tonic with no features at all: the server
//! and the client connect with the workspace's own hyper.
//!
//! Service `relaytest.Echo`:
//! - `Say` (unary): [`SayRequest`] → [`SayReply`], which echoes the message
//!   and reports the path and metadata the server got. A message
//!   `fail:<code>` answers that gRPC status code instead (e.g. `fail:5`,
//!   `NOT_FOUND`), to test error statuses in trailers-only responses.
//! - `Count` (server streaming): [`CountRequest`] → `count` [`CountReply`]s
//!   of `size` payload bytes, one every `interval_ms`. A stream dropped before
//!   its end (the client went away) is recorded as cancelled
//!   ([`GrpcServer::wait_for_cancelled_stream`]).
//!
//! [`GrpcClient`] targets any base URL, including one with a path prefix:
//! through the relay, `http://RELAY/hosts/<hostId>` turns
//! `/relaytest.Echo/Say` into `/hosts/<hostId>/relaytest.Echo/Say`; and it
//! can send `authorization: Bearer <token>`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use bytes::{Buf, BufMut};
use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use http::{Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::{Grpc, ServerStreamingService, UnaryService};
use tonic::{Code, Status};

use crate::bulk::ACCEPT_ERROR_BACKOFF;

/// The service's full name.
pub const SERVICE: &str = "relaytest.Echo";
/// Path of the unary method.
pub const SAY_PATH: &str = "/relaytest.Echo/Say";
/// Path of the server-streaming method.
pub const COUNT_PATH: &str = "/relaytest.Echo/Count";

// === messages ===

/// `Say`'s request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SayRequest {
    /// Echoed back; `fail:<code>` makes the call fail with that status code.
    pub message: String,
}

/// `Say`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SayReply {
    /// The request's message.
    pub message: String,
    /// The path the server got (without any prefix the relay stripped).
    pub path: String,
    /// Every ASCII metadata entry (request header) the server got, by name.
    pub metadata: BTreeMap<String, String>,
}

/// `Count`'s request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountRequest {
    /// How many replies.
    pub count: u32,
    /// Payload bytes per reply.
    pub size: usize,
    /// Pause between replies (the first is sent at once).
    pub interval_ms: u64,
}

/// One of `Count`'s replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountReply {
    /// 0, 1, 2, ...
    pub seq: u32,
    /// `size` bytes: the decimal `seq` repeated, so a test can check it.
    pub payload: String,
}

/// The payload of reply `seq` of a `size`-byte [`CountRequest`].
pub fn count_payload(seq: u32, size: usize) -> String {
    seq.to_string().chars().cycle().take(size).collect()
}

// === JsonCodec ===

/// A tonic codec that encodes `E` and decodes `D` as JSON (serde) message
/// bodies.
pub struct JsonCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for JsonCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// [`JsonCodec`]'s encoder.
pub struct JsonEncoder<E>(PhantomData<fn(E)>);

/// [`JsonCodec`]'s decoder.
pub struct JsonDecoder<D>(PhantomData<fn() -> D>);

impl<E, D> Codec for JsonCodec<E, D>
where
    E: Serialize + Send + 'static,
    D: DeserializeOwned + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = JsonEncoder<E>;
    type Decoder = JsonDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        JsonEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        JsonDecoder(PhantomData)
    }
}

impl<E: Serialize> Encoder for JsonEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        serde_json::to_writer(dst.writer(), &item)
            .map_err(|err| Status::internal(format!("encode JSON message: {err}")))
    }
}

impl<D: DeserializeOwned> Decoder for JsonDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        // `src` holds exactly one message: tonic did the gRPC framing.
        serde_json::from_reader(src.reader())
            .map(Some)
            .map_err(|err| Status::invalid_argument(format!("decode JSON message: {err}")))
    }
}

// === server recordings ===

/// How a `Count` stream ended, as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOutcome {
    /// Still sending.
    InProgress,
    /// Every reply was handed to the connection.
    Completed,
    /// Dropped before its last reply: the client went away or reset it.
    Cancelled,
}

/// One call the server got.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// The request path as received.
    pub path: String,
    /// Its ASCII metadata.
    pub metadata: BTreeMap<String, String>,
    /// When it arrived.
    pub at: Instant,
    /// For `Count`: replies sent so far and how the stream ended.
    pub stream: Option<(u32, StreamOutcome)>,
}

#[derive(Default)]
struct Calls {
    /// A std mutex: held only to push or copy.
    calls: Mutex<Vec<GrpcCall>>,
    /// The path of every request, known method or not.
    paths: Mutex<Vec<String>>,
    /// Bumped on every change, to wake waiters.
    changed: watch::Sender<u64>,
}

impl Calls {
    fn record<T>(&self, f: impl FnOnce(&mut Vec<GrpcCall>) -> T) -> T {
        let out = f(&mut self.calls.lock().expect("calls poisoned"));
        self.changed.send_modify(|version| *version += 1);
        out
    }
}

fn ascii_metadata(metadata: &MetadataMap) -> BTreeMap<String, String> {
    metadata
        .clone()
        .into_headers()
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

// === GrpcServer ===

/// The running gRPC server. Dropping it stops accepting and closes every
/// connection.
pub struct GrpcServer {
    addr: SocketAddr,
    calls: Arc<Calls>,
    task: JoinHandle<()>,
}

// === impl GrpcServer ===

impl GrpcServer {
    /// Binds `127.0.0.1:0` and serves `relaytest.Echo` over h2c (HTTP/1.1
    /// requests get hyper's answer to a gRPC call over HTTP/1.1: an error).
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn spawn() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC server on 127.0.0.1:0");
        let addr = listener.local_addr().expect("gRPC server local addr");
        let calls = Arc::new(Calls::default());
        let task = tokio::spawn(accept_loop(listener, calls.clone()));
        Self { addr, calls, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL of a direct [`GrpcClient`].
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<GrpcCall> {
        self.calls.calls.lock().expect("calls poisoned").clone()
    }

    /// The path of every request so far, including those that named no
    /// method (answered `UNIMPLEMENTED`).
    pub fn paths(&self) -> Vec<String> {
        self.calls.paths.lock().expect("paths poisoned").clone()
    }

    /// Waits until a `Count` stream was cancelled and returns its call.
    ///
    /// # Panics
    ///
    /// If none is within `timeout`.
    pub async fn wait_for_cancelled_stream(&self, timeout: Duration) -> GrpcCall {
        let mut changed = self.calls.changed.subscribe();
        let wait = async {
            loop {
                changed.borrow_and_update();
                let found = self
                    .calls()
                    .into_iter()
                    .find(|call| matches!(call.stream, Some((_, StreamOutcome::Cancelled))));
                if let Some(call) = found {
                    return call;
                }
                changed
                    .changed()
                    .await
                    .expect("the sender lives as long as the server");
            }
        };
        crate::wait::within("a cancelled Count stream", timeout, wait).await
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; aborting drops `connections`, which
/// aborts every connection task.
async fn accept_loop(listener: TcpListener, calls: Arc<Calls>) {
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
        let _ = stream.set_nodelay(true);
        let calls = calls.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| route(calls.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Hands the request to the method its path names.
async fn route(
    calls: Arc<Calls>,
    req: Request<Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let path = req.uri().path().to_owned();
    calls
        .paths
        .lock()
        .expect("paths poisoned")
        .push(path.clone());
    Ok(match path.as_str() {
        SAY_PATH => {
            let mut grpc = Grpc::new(JsonCodec::<SayReply, SayRequest>::default());
            grpc.unary(Say { calls, path }, req).await
        }
        COUNT_PATH => {
            let mut grpc = Grpc::new(JsonCodec::<CountReply, CountRequest>::default());
            grpc.server_streaming(Count { calls, path }, req).await
        }
        _ => Status::unimplemented(format!("no method {path} in {SERVICE}")).into_http(),
    })
}

/// The `Say` method.
struct Say {
    calls: Arc<Calls>,
    path: String,
}

impl UnaryService<SayRequest> for Say {
    type Response = SayReply;
    type Future = std::future::Ready<Result<tonic::Response<SayReply>, Status>>;

    fn call(&mut self, request: tonic::Request<SayRequest>) -> Self::Future {
        let metadata = ascii_metadata(request.metadata());
        self.calls.record(|calls| {
            calls.push(GrpcCall {
                path: self.path.clone(),
                metadata: metadata.clone(),
                at: Instant::now(),
                stream: None,
            });
        });
        let message = request.into_inner().message;
        if let Some(code) = message.strip_prefix("fail:") {
            let code = code.parse::<i32>().map_or(Code::Unknown, Code::from_i32);
            return std::future::ready(Err(Status::new(code, format!("asked to fail: {message}"))));
        }
        std::future::ready(Ok(tonic::Response::new(SayReply {
            message,
            path: self.path.clone(),
            metadata,
        })))
    }
}

/// The `Count` method.
struct Count {
    calls: Arc<Calls>,
    path: String,
}

/// `Count`'s reply stream.
type CountStream = Pin<Box<dyn Stream<Item = Result<CountReply, Status>> + Send>>;

impl ServerStreamingService<CountRequest> for Count {
    type Response = CountReply;
    type ResponseStream = CountStream;
    type Future = std::future::Ready<Result<tonic::Response<CountStream>, Status>>;

    fn call(&mut self, request: tonic::Request<CountRequest>) -> Self::Future {
        let metadata = ascii_metadata(request.metadata());
        let req = request.into_inner();
        let index = self.calls.record(|calls| {
            calls.push(GrpcCall {
                path: self.path.clone(),
                metadata,
                at: Instant::now(),
                stream: Some((
                    0,
                    if req.count == 0 {
                        StreamOutcome::Completed
                    } else {
                        StreamOutcome::InProgress
                    },
                )),
            });
            calls.len() - 1
        });
        let progress = StreamProgress {
            calls: self.calls.clone(),
            index,
            sent: 0,
            count: req.count,
        };
        let interval = Duration::from_millis(req.interval_ms);
        let stream = futures_util::stream::unfold(progress, move |mut progress| async move {
            if progress.sent == progress.count {
                return None;
            }
            if progress.sent > 0 {
                tokio::time::sleep(interval).await;
            }
            let reply = CountReply {
                seq: progress.sent,
                payload: count_payload(progress.sent, req.size),
            };
            progress.advance();
            Some((Ok(reply), progress))
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(stream))))
    }
}

/// A `Count` stream's progress; dropped with the stream, which is how a
/// cancellation is seen.
struct StreamProgress {
    calls: Arc<Calls>,
    index: usize,
    sent: u32,
    count: u32,
}

impl StreamProgress {
    fn advance(&mut self) {
        self.sent += 1;
        let (index, sent, done) = (self.index, self.sent, self.sent == self.count);
        self.calls.record(|calls| {
            let outcome = if done {
                StreamOutcome::Completed
            } else {
                StreamOutcome::InProgress
            };
            calls[index].stream = Some((sent, outcome));
        });
    }
}

impl Drop for StreamProgress {
    fn drop(&mut self) {
        if self.sent < self.count {
            let (index, sent) = (self.index, self.sent);
            self.calls.record(|calls| {
                calls[index].stream = Some((sent, StreamOutcome::Cancelled));
            });
        }
    }
}

// === GrpcClient ===

/// The HTTP/2-only hyper client under [`GrpcClient`].
type H2Client = Client<HttpConnector, tonic::body::Body>;

/// A `relaytest.Echo` client over h2c.
#[derive(Clone)]
pub struct GrpcClient {
    grpc: tonic::client::Grpc<H2Client>,
    bearer: Option<String>,
}

/// A unary reply with its response metadata.
#[derive(Debug)]
pub struct GrpcReply<T> {
    /// The message.
    pub message: T,
    /// Response headers and trailers, merged (tonic's view); `grpc-status`
    /// is among them.
    pub metadata: MetadataMap,
}

/// Everything a `Count` call returned.
#[derive(Debug)]
pub struct CountResult {
    /// The replies, in order.
    pub replies: Vec<CountReply>,
    /// When each reply arrived.
    pub arrivals: Vec<Instant>,
    /// Response headers.
    pub headers: MetadataMap,
    /// The trailers (`grpc-status` and friends).
    pub trailers: Option<MetadataMap>,
}

// === impl GrpcClient ===

impl GrpcClient {
    /// A client for `base_url`, `http://HOST:PORT` optionally followed by a
    /// path prefix that every method path is appended to (through the
    /// relay: `http://RELAY/hosts/<hostId>`). Connects on the first call.
    ///
    /// # Errors
    ///
    /// If `base_url` is not an `http://` URL.
    pub fn new(base_url: &str) -> Result<Self> {
        let trimmed = base_url.trim_end_matches('/');
        let origin: Uri = trimmed
            .parse()
            .with_context(|| format!("parse gRPC base URL {base_url:?}"))?;
        if origin.scheme_str() != Some("http") || origin.authority().is_none() {
            return Err(anyhow!(
                "gRPC base URL {base_url:?} is not http://HOST[:PORT][/prefix]"
            ));
        }
        let client = Client::builder(TokioExecutor::new())
            // gRPC is HTTP/2; without TLS that means prior knowledge (h2c).
            .http2_only(true)
            .build_http();
        Ok(Self {
            grpc: tonic::client::Grpc::with_origin(client, origin),
            bearer: None,
        })
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.bearer {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .expect("a JWT is a valid header value");
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|err| Status::unavailable(format!("gRPC client not ready: {err}")))
    }

    /// Calls `Say`.
    ///
    /// # Errors
    ///
    /// The call's non-OK status (including transport errors, as tonic
    /// reports them).
    pub async fn say(&mut self, message: &str) -> Result<GrpcReply<SayReply>, Status> {
        self.ready().await?;
        let request = self.request(SayRequest {
            message: message.to_owned(),
        });
        let response = self
            .grpc
            .unary(
                request,
                PathAndQuery::from_static(SAY_PATH),
                JsonCodec::<SayRequest, SayReply>::default(),
            )
            .await?;
        let (metadata, message, _) = response.into_parts();
        Ok(GrpcReply { message, metadata })
    }

    /// Calls `Count` and returns the reply stream as it arrives (drop it to
    /// cancel the call).
    ///
    /// # Errors
    ///
    /// The call's status if it fails before the first reply.
    pub async fn count_stream(
        &mut self,
        request: CountRequest,
    ) -> Result<tonic::Response<tonic::Streaming<CountReply>>, Status> {
        self.ready().await?;
        let request = self.request(request);
        self.grpc
            .server_streaming(
                request,
                PathAndQuery::from_static(COUNT_PATH),
                JsonCodec::<CountRequest, CountReply>::default(),
            )
            .await
    }

    /// Calls `Count` and reads the whole stream and its trailers.
    ///
    /// # Errors
    ///
    /// The call's non-OK status, whenever it comes.
    pub async fn count(&mut self, request: CountRequest) -> Result<CountResult, Status> {
        let (headers, mut stream, _) = self.count_stream(request).await?.into_parts();
        let mut replies = Vec::new();
        let mut arrivals = Vec::new();
        while let Some(reply) = stream.next().await {
            replies.push(reply?);
            arrivals.push(Instant::now());
        }
        let trailers = stream.trailers().await?;
        Ok(CountResult {
            replies,
            arrivals,
            headers,
            trailers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEADLINE;
    use crate::wait::within;

    fn status_of(metadata: &MetadataMap) -> Option<&str> {
        metadata.get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn a_unary_call_returns_its_reply_and_an_ok_status_in_the_trailers() {
        let server = GrpcServer::spawn().await;
        let mut client = GrpcClient::new(&server.url()).unwrap();
        let reply = within("Say", DEADLINE, client.say("hello")).await.unwrap();
        assert_eq!(reply.message.message, "hello");
        assert_eq!(reply.message.path, SAY_PATH);
        assert_eq!(
            reply
                .message
                .metadata
                .get("content-type")
                .map(String::as_str),
            Some("application/grpc")
        );
        assert_eq!(
            reply.message.metadata.get("te").map(String::as_str),
            Some("trailers")
        );
        // Tonic merges the trailers into the reply's metadata.
        assert_eq!(
            status_of(&reply.metadata),
            Some("0"),
            "{:?}",
            reply.metadata
        );
        let calls = server.calls();
        assert_eq!(calls.len(), 1);
        assert!(!calls[0].metadata.contains_key("authorization"));
    }

    #[tokio::test]
    async fn the_bearer_token_reaches_the_server() {
        let server = GrpcServer::spawn().await;
        let mut client = GrpcClient::new(&server.url()).unwrap().bearer("tok.en.sig");
        let reply = within("Say", DEADLINE, client.say("hi")).await.unwrap();
        assert_eq!(
            reply
                .message
                .metadata
                .get("authorization")
                .map(String::as_str),
            Some("Bearer tok.en.sig")
        );
        assert_eq!(
            server.calls()[0]
                .metadata
                .get("authorization")
                .map(String::as_str),
            Some("Bearer tok.en.sig")
        );
    }

    /// Through the relay the base URL carries `/hosts/<hostId>`: the client
    /// must put the method path after it. Straight at the server, that path
    /// names no method, which is what shows where the client sent it.
    #[tokio::test]
    async fn a_path_prefix_goes_before_the_method_path() {
        let server = GrpcServer::spawn().await;
        let base = format!("{}/hosts/printer-7/", server.url());
        let mut client = GrpcClient::new(&base).unwrap();
        let status = within("Say", DEADLINE, client.say("hi")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert_eq!(server.paths(), ["/hosts/printer-7/relaytest.Echo/Say"]);
        assert!(GrpcClient::new("https://127.0.0.1:1").is_err());
        assert!(GrpcClient::new("/no/authority").is_err());
    }

    #[tokio::test]
    async fn a_failing_call_reports_its_status_code() {
        let server = GrpcServer::spawn().await;
        let mut client = GrpcClient::new(&server.url()).unwrap();
        let status = within("Say", DEADLINE, client.say("fail:5"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("asked to fail"), "{status:?}");
    }

    #[tokio::test]
    async fn a_server_stream_delivers_every_reply_then_an_ok_status() {
        let server = GrpcServer::spawn().await;
        let mut client = GrpcClient::new(&server.url()).unwrap();
        let request = CountRequest {
            count: 5,
            size: 100_000,
            interval_ms: 20,
        };
        let result = within("Count", DEADLINE, client.count(request))
            .await
            .unwrap();
        let seqs: Vec<u32> = result.replies.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        for reply in &result.replies {
            assert_eq!(reply.payload, count_payload(reply.seq, 100_000));
        }
        // Paced by the server, so spread out at the client.
        let spread = result.arrivals[4] - result.arrivals[0];
        assert!(spread >= Duration::from_millis(60), "{spread:?}");
        let trailers = result.trailers.expect("trailers");
        assert_eq!(status_of(&trailers), Some("0"), "{trailers:?}");
        assert_eq!(
            result
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/grpc")
        );
        assert_eq!(
            server.calls()[0].stream,
            Some((5, StreamOutcome::Completed))
        );
    }

    #[tokio::test]
    async fn dropping_a_server_stream_cancels_it_at_the_server() {
        let server = GrpcServer::spawn().await;
        let mut client = GrpcClient::new(&server.url()).unwrap();
        let request = CountRequest {
            count: 100_000,
            size: 10,
            interval_ms: 10,
        };
        let mut stream = within("Count", DEADLINE, client.count_stream(request))
            .await
            .unwrap()
            .into_inner();
        for seq in 0..2 {
            let reply = within("a reply", DEADLINE, stream.next()).await;
            assert_eq!(reply.expect("a reply").expect("not an error").seq, seq);
        }
        drop(stream);
        let call = server.wait_for_cancelled_stream(DEADLINE).await;
        let (sent, _) = call.stream.expect("a Count call");
        assert!((2..100_000).contains(&sent), "{sent}");
    }
}
