//! One-off HTTP exchanges of the tunnel comparison, each on a fresh connection: a bulk
//! download, a bulk upload, and the wait for the first Server-Sent Event.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Size of each chunk of an upload body.
const CHUNK_LEN: usize = 64 * 1024;

/// What an upload sends, chunk after chunk (ASCII, for the same reason as the upstream's
/// downloads: a v1 tunnel would carry anything else as base64).
static CHUNK: [u8; CHUNK_LEN] = [b'y'; CHUNK_LEN];

/// Where and as whom to send one exchange.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The server to connect to (upstream, tunnel entry or relay).
    pub addr: SocketAddr,
    /// Prepended to every path (`/hosts/<hostId>` through the relay).
    pub prefix: String,
    /// Bearer token, if any.
    pub bearer: Option<String>,
}

/// The result of a transfer that completed, or why it did not.
pub type Transfer = Result<Duration, String>;

async fn send<B>(
    endpoint: &Endpoint,
    request: http::request::Builder,
    body: B,
) -> Result<http::Response<Incoming>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(endpoint.addr)
        .await
        .with_context(|| format!("cannot connect to {}", endpoint.addr))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends with the exchange (the sender is dropped with it).
    tokio::spawn(conn);
    let mut request = request.header(http::header::HOST, endpoint.addr.to_string());
    if let Some(token) = &endpoint.bearer {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    Ok(sender.send_request(request.body(body)?).await?)
}

/// Reads what is left of a refused exchange's body, briefly, for the report.
async fn refusal(response: http::Response<Incoming>) -> String {
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    format!("HTTP {}: {}", status.as_u16(), text.trim())
}

/// Downloads `/bytes/<size>` and checks that `size` bytes arrived. The time is from
/// sending the request to the last byte.
pub async fn download(endpoint: &Endpoint, size: u64, deadline: Duration) -> Transfer {
    let started = Instant::now();
    let exchange = async {
        let path = format!("{}/bytes/{size}", endpoint.prefix);
        let response = send(endpoint, http::Request::get(path), Empty::<Bytes>::new())
            .await
            .map_err(|e| format!("{e:#}"))?;
        if response.status() != http::StatusCode::OK {
            return Err(refusal(response).await);
        }
        let mut body = response.into_body();
        let mut read: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("after {read} bytes: {e}"))?;
            if let Some(data) = frame.data_ref() {
                read += data.len() as u64;
            }
        }
        if read != size {
            return Err(format!("{read} bytes arrived, {size} expected"));
        }
        Ok(started.elapsed())
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("not done after {deadline:?}")))
}

/// Uploads `size` bytes to `/upload` and checks that the upstream counted them all. The
/// time is from sending the request to the end of the response.
///
/// Written on a raw connection, not with hyper's client: a server that refuses a body
/// (v1's 413) answers before reading it and closes, and hyper then reports only its
/// failed write. Reading while writing shows the answer that was sent.
pub async fn upload(endpoint: &Endpoint, size: u64, deadline: Duration) -> Transfer {
    let started = Instant::now();
    let sent = Cell::new(0u64);
    let exchange = async {
        let stream = TcpStream::connect(endpoint.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", endpoint.addr))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let mut head = format!(
            "POST {}/upload HTTP/1.1\r\nhost: {}\r\ncontent-type: application/octet-stream\r\n\
             content-length: {size}\r\n",
            endpoint.prefix, endpoint.addr
        );
        if let Some(token) = &endpoint.bearer {
            head.push_str(&format!("authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        let writer = async {
            wr.write_all(head.as_bytes()).await?;
            while sent.get() < size {
                let len = (size - sent.get()).min(CHUNK_LEN as u64);
                wr.write_all(&CHUNK[..len as usize]).await?;
                sent.set(sent.get() + len);
            }
            Ok::<(), std::io::Error>(())
        };
        let reader = read_response(&mut rd);
        tokio::pin!(writer, reader);
        let mut written = None;
        let response = loop {
            tokio::select! {
                result = &mut writer, if written.is_none() => written = Some(result),
                response = &mut reader => break response,
            }
        };
        let progress = || match &written {
            Some(Ok(())) => "the whole body sent".to_owned(),
            Some(Err(e)) => format!("{} of {size} bytes sent, then: {e}", sent.get()),
            None => format!("{} of {size} bytes sent", sent.get()),
        };
        let (status, body) = response.map_err(|e| format!("no answer ({e}); {}", progress()))?;
        let text = String::from_utf8_lossy(&body[..body.len().min(120)])
            .trim()
            .to_owned();
        if status != 200 {
            // How far the body got varies from run to run; the report groups failures by
            // their text, so it only says whether the answer came before the end.
            let when = if matches!(written, Some(Ok(()))) {
                "after the whole body"
            } else {
                "before the whole body was sent"
            };
            return Err(format!("HTTP {status}: {text} ({when})"));
        }
        if !matches!(written, Some(Ok(()))) {
            return Err(format!(
                "HTTP 200 before the body was sent ({})",
                progress()
            ));
        }
        if text != size.to_string() {
            return Err(format!("the upstream counted {text:?} bytes, {size} sent"));
        }
        Ok(started.elapsed())
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "not done after {deadline:?} ({} bytes sent)",
                sent.get()
            ))
        })
}

/// Reads one HTTP/1.1 response: its status and body (framed by `content-length`, by
/// chunks, whose framing is kept, or by the end of the connection).
async fn read_response(rd: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection ended before a response head",
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed status line in {head:?}")))?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    let mut body = buf.split_off(head_end);
    loop {
        let done = match length {
            Some(n) => body.len() >= n,
            None => chunked && body.ends_with(b"0\r\n\r\n"),
        };
        if done || rd.read_buf(&mut body).await? == 0 {
            break;
        }
    }
    if let Some(n) = length {
        body.truncate(n);
    }
    Ok((status, body))
}

/// Requests `/sse?delay_ms=…&hold_ms=…` and returns how long after the upstream wrote its
/// first event the event was received here (both clocks are `epoch`, this process's).
///
/// # Errors
/// When the exchange fails, no event arrives before `deadline`, or it is malformed.
pub async fn sse_first_event(
    endpoint: &Endpoint,
    epoch: Instant,
    delay: Duration,
    hold: Duration,
    deadline: Duration,
) -> Result<Duration> {
    let exchange = async {
        let path = format!(
            "{}/sse?delay_ms={}&hold_ms={}",
            endpoint.prefix,
            delay.as_millis(),
            hold.as_millis()
        );
        let request = http::Request::get(path).header(http::header::ACCEPT, "text/event-stream");
        let response = send(endpoint, request, Empty::<Bytes>::new()).await?;
        if response.status() != http::StatusCode::OK {
            bail!("{}", refusal(response).await);
        }
        let mut body = response.into_body();
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            seen.extend_from_slice(data);
            // An event ends with a blank line.
            if let Some(end) = seen.windows(2).position(|w| w == b"\n\n") {
                let received = epoch.elapsed();
                let event = String::from_utf8_lossy(&seen[..end]);
                let written: u64 = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| anyhow!("malformed event {event:?}"))?;
                // Dropping the body here closes the connection: the stream is not
                // waited on any further.
                return Ok(received.saturating_sub(Duration::from_nanos(written)));
            }
        }
        bail!(
            "the stream ended without an event; it carried {:?}",
            String::from_utf8_lossy(&seen)
        )
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| anyhow!("no event within {deadline:?}"))?
}
