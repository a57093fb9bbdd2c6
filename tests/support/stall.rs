//! [`StallingReads`]: a peer that keeps its connection open and stops reading it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A socket whose reads stop, for good, once [`StallingReads::stall`] is called; writes
/// go on. Under an HTTP/2 client, the connection stays up and keeps sending, and reads
/// nothing more.
pub struct StallingReads {
    io: TcpStream,
    stalled: Arc<AtomicBool>,
}

impl StallingReads {
    /// `io`, reading until stalled; and the switch.
    pub fn new(io: TcpStream) -> (StallingReads, Stall) {
        let stalled = Arc::new(AtomicBool::new(false));
        (
            StallingReads {
                io,
                stalled: stalled.clone(),
            },
            Stall(stalled),
        )
    }
}

/// Stops the reads of its [`StallingReads`].
#[derive(Debug, Clone)]
pub struct Stall(Arc<AtomicBool>);

impl Stall {
    /// No read completes from now on.
    pub fn stall(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl AsyncRead for StallingReads {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.stalled.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallingReads {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
