//! One HTTP/2 stream inside an `h2` tunnel, on either side, as `http` and tokio types: a
//! body sent under the stream's flow control ([`send_body`]: the relay's requests, the
//! agent's responses), a body that gives the window back as it is read ([`RecvBody`]:
//! the agent's responses at the relay, the relay's requests at the agent), and the byte
//! stream of an extended CONNECT (a channel's WebSocket, [`StreamIo`]).
//!
//! These are what hyper wraps around `h2` for the same purpose; relay and agent drive
//! `h2` themselves so that a stream is served from one task, without hyper's hand-offs
//! between tasks. Flow control, framing and resets stay `h2`'s.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Sends `body` on `stream`: each chunk once the stream has send capacity for it (the
/// peer's window, bounded by `h2`'s send buffer), then its end or its trailers. Ends
/// early when the agent resets the stream. A body that fails resets the stream
/// (`CANCEL`), so the agent aborts its upstream request.
///
/// # Errors
/// The body's error, or the stream's if the agent reset it or the connection ended.
pub(crate) async fn send_body<B>(mut stream: SendStream<Bytes>, body: B) -> Result<(), SendError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    loop {
        // Like hyper, ask for the body's next frame before claiming any window: a claim
        // held while the body has nothing pins the connection's window for every other
        // stream. A reset wakes the wait.
        let frame = std::future::poll_fn(|cx| {
            poll_reset(&mut stream, cx)?;
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => {
                return stream
                    .send_data(Bytes::new(), true)
                    .map_err(SendError::Stream);
            }
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                stream.send_reset(Reason::CANCEL);
                return Err(SendError::Body(err.into()));
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                let end = body.is_end_stream();
                if end && !data.has_remaining() {
                    stream
                        .send_data(Bytes::new(), true)
                        .map_err(SendError::Stream)?;
                }
                while data.has_remaining() {
                    let n = std::future::poll_fn(|cx| {
                        poll_reset(&mut stream, cx)?;
                        poll_capacity(&mut stream, data.remaining(), cx)
                    })
                    .await?;
                    let chunk = data.split_to(n);
                    stream
                        .send_data(chunk, end && !data.has_remaining())
                        .map_err(SendError::Stream)?;
                }
                if end {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    return stream.send_trailers(trailers).map_err(SendError::Stream);
                }
            }
        }
    }
}

/// Why a request body did not go out whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// The client's body failed (its connection went, or it sent too slowly).
    #[error("request body failed: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The agent reset the stream, or the connection ended.
    #[error("HTTP/2 stream failed: {0}")]
    Stream(h2::Error),
}

/// `Err` once the agent has reset the stream; registers for the reset otherwise.
fn poll_reset(stream: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Result<(), SendError> {
    match stream.poll_reset(cx) {
        Poll::Pending => Ok(()),
        Poll::Ready(Ok(reason)) => Err(SendError::Stream(reason.into())),
        Poll::Ready(Err(err)) => Err(SendError::Stream(err)),
    }
}

/// Waits until `stream` may send, and says how much of `wanted` it may send now.
fn poll_capacity(
    stream: &mut SendStream<Bytes>,
    wanted: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, SendError>> {
    loop {
        let capacity = stream.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity.min(wanted)));
        }
        stream.reserve_capacity(wanted);
        match ready!(stream.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Poll::Ready(Err(SendError::Stream(err))),
            None => {
                return Poll::Ready(Err(SendError::Stream(h2::Error::from(
                    Reason::STREAM_CLOSED,
                ))));
            }
        }
    }
}

/// A response body from the agent: data as it arrives, each chunk's window given back
/// as it is handed on, then the trailers. A reset with `NO_ERROR` after the answer ends
/// it cleanly (RFC 9113 §8.1: the agent needs no more of the request); any other reset
/// fails it, so a cut download never looks complete.
pub(crate) struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    /// What `Content-Length` says is left, when it said.
    remaining: Option<u64>,
}

impl RecvBody {
    pub(crate) fn new(recv: RecvStream, headers: &HeaderMap) -> RecvBody {
        let remaining = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        RecvBody {
            recv,
            data_done: false,
            remaining,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut self.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) if err.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(err) if err.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// The two halves of an extended CONNECT stream as one byte stream: reads give the
/// stream's window back as they take bytes, writes wait for send capacity, and shutdown
/// ends this side of the stream.
pub(crate) struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What the last DATA frame brought and no read has taken yet.
    read: Bytes,
}

impl StreamIo {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> StreamIo {
        StreamIo {
            send,
            recv,
            read: Bytes::new(),
        }
    }
}

/// A stream error as an I/O error; a reset that only ends the stream is the end.
fn io_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, err)
}

impl tokio::io::AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.read = data,
                Some(Err(err))
                    if matches!(err.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        // The window comes back as the reader takes bytes, not as they arrive.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = match ready!(poll_capacity(&mut self.send, data.len(), cx)) {
            Ok(n) => n,
            Err(SendError::Stream(err)) => return Poll::Ready(Err(io_error(err))),
            Err(SendError::Body(err)) => return Poll::Ready(Err(io::Error::other(err))),
        };
        self.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes what it was given as the connection's task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send.reserve_capacity(0);
        Poll::Ready(self.send.send_data(Bytes::new(), true).map_err(io_error))
    }
}
