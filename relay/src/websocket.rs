//! WebSocket plumbing shared by tunnels, client channels and relay-to-relay bridges.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws::{Message, WebSocketUpgrade};
use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use crate::limits::{Limits, MAX_CLOSE_REASON, TUNNEL_READ_AHEAD, WS_READ_BUFFER, WS_WRITE_BUFFER};

/// Applies the relay's socket limits and buffer sizes to a WebSocket upgrade.
///
/// The write buffer is left unbounded on purpose: the session writes one batch at a time
/// from a bounded queue, so that queue is the bound, and a cap here would only turn one
/// large message into an error.
pub(crate) fn configure(upgrade: WebSocketUpgrade, limits: &Limits) -> WebSocketUpgrade {
    upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
}

/// Bytes read from a tunnel's socket ahead of its WebSocket codec.
///
/// tungstenite reads at most its read buffer per system call, and zero-fills that much of
/// the buffer before every read, including one that finds nothing: a large buffer makes
/// every poll of an idle socket pay a large `memset`, a small one makes a bulk transfer
/// pay a system call per few KiB. Reading up to [`TUNNEL_READ_AHEAD`] here, into spare
/// capacity that is not zero-filled, lets the codec keep a small buffer
/// ([`WS_READ_BUFFER`]): a busy tunnel reads 64 KiB per call, and a socket with nothing to
/// read costs no buffer at all (it is given back whenever it is empty). Used by the relay
/// for its tunnels ([`crate::connections::ReadCharged`]) and by the agent for its own.
///
/// Until a read fills the codec's buffer, the socket is read straight into it: most polls
/// find nothing or a small message, and those then cost no buffer of ours (an allocation
/// of 64 KiB and its release, several times per request). A read that fills the codec's
/// buffer says more is waiting: from then on the socket is read ahead, until it has
/// nothing left.
#[derive(Debug, Default)]
pub struct ReadAhead {
    ahead: BytesMut,
    /// The last read filled the codec's buffer, or read ahead, and the socket has not
    /// said it has nothing since.
    streaming: bool,
}

impl ReadAhead {
    /// Starts with `bytes` already read (a TLS connection's first ones).
    pub fn with(bytes: BytesMut) -> ReadAhead {
        ReadAhead {
            ahead: bytes,
            streaming: false,
        }
    }

    /// Memory held (tests check that an idle socket holds none).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.ahead.capacity()
    }

    /// Whether nothing read ahead is waiting.
    pub fn is_empty(&self) -> bool {
        self.ahead.is_empty()
    }

    /// Fills `buf` from what was read ahead, reading from `io` when nothing is left.
    pub fn poll_read<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ahead.is_empty() && !self.streaming {
            let offered = buf.remaining();
            let before = buf.filled().len();
            std::task::ready!(Pin::new(io).poll_read(cx, buf))?;
            self.streaming = offered > 0 && buf.filled().len() - before == offered;
            return Poll::Ready(Ok(()));
        }
        if self.ahead.is_empty() {
            self.ahead.reserve(TUNNEL_READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.ahead) {
                Poll::Pending => {
                    // Nothing to read: an idle tunnel waits holding no buffer.
                    self.ahead = BytesMut::new();
                    self.streaming = false;
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        // Not `split_to`: that shares the buffer (an allocation and reference counts)
        // only to drop the part split off at once.
        bytes::Buf::advance(&mut self.ahead, n);
        if self.ahead.is_empty() {
            // An idle tunnel holds no read-ahead memory.
            self.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// A socket's read half read through a [`ReadAhead`] (joined with its write half by
/// [`tokio::io::join`] where both are needed).
#[derive(Debug)]
pub struct ReadsAhead<T> {
    io: T,
    ahead: ReadAhead,
}

impl<T> ReadsAhead<T> {
    /// `io`, read ahead of its reader.
    pub fn new(io: T) -> ReadsAhead<T> {
        ReadsAhead {
            io,
            ahead: ReadAhead::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadsAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.ahead.poll_read(&mut this.io, cx, buf)
    }
}

/// The payload length of a ping or pong; `None` for a data message or a close.
pub fn control_len(message: &Message) -> Option<usize> {
    match message {
        Message::Ping(payload) | Message::Pong(payload) => Some(payload.len()),
        _ => None,
    }
}

/// Whether a WebSocket error is a message over the size limit (tungstenite's `Capacity`,
/// possibly wrapped, as axum does).
pub fn is_too_big(err: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(WsError::Capacity(_)) = err.downcast_ref::<WsError>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// `reason` cut to what a Close frame may carry (RFC 6455: 123 bytes), on a character
/// boundary.
pub fn close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        assert_eq!(close_reason("drained"), "drained");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON && cut.len() >= MAX_CLOSE_REASON - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn reading_ahead_hands_out_everything_in_order_and_holds_no_buffer_when_idle() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut peer, socket) = tokio::io::duplex(256 * 1024);
        let mut ahead = ReadsAhead {
            io: socket,
            ahead: ReadAhead::with(BytesMut::from(&b"first "[..])),
        };
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        // What was read before is handed out first, then the socket's bytes, in reads
        // smaller than what was read ahead.
        let mut got = vec![0; 6];
        ahead.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"first ");
        let mut got = Vec::new();
        let mut chunk = [0; 4096];
        while got.len() < sent.len() {
            let n = ahead.read(&mut chunk).await.unwrap();
            assert!(n > 0 && n <= chunk.len());
            got.extend_from_slice(&chunk[..n]);
            if got.len() > chunk.len() && got.len() < TUNNEL_READ_AHEAD {
                // The first read filled the reader's buffer: the next read 64 KiB ahead.
                assert!(!ahead.ahead.is_empty(), "reading ahead after a full read");
            }
        }
        assert_eq!(got, sent);
        // Drained: nothing held, not even capacity, while the socket has nothing.
        let idle =
            tokio::time::timeout(std::time::Duration::from_millis(20), ahead.read(&mut chunk))
                .await;
        assert!(idle.is_err(), "nothing to read");
        assert_eq!(ahead.ahead.capacity(), 0);
        drop(peer);
        assert_eq!(ahead.read(&mut chunk).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn small_reads_and_empty_polls_go_straight_into_the_readers_buffer() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut peer, socket) = tokio::io::duplex(64 * 1024);
        let mut ahead = ReadsAhead::new(socket);
        let mut chunk = [0; 4096];
        for message in [&b"small"[..], &[9u8; 4095][..]] {
            peer.write_all(message).await.unwrap();
            let n = ahead.read(&mut chunk).await.unwrap();
            assert_eq!(&chunk[..n], message);
            assert_eq!(
                ahead.ahead.capacity(),
                0,
                "no buffer of ours for a short read"
            );
            let idle =
                tokio::time::timeout(std::time::Duration::from_millis(20), ahead.read(&mut chunk))
                    .await;
            assert!(idle.is_err(), "nothing to read");
            assert_eq!(
                ahead.ahead.capacity(),
                0,
                "nor for a poll that finds nothing"
            );
        }
    }

    #[test]
    fn capacity_errors_are_recognized_through_wrappers() {
        use tokio_tungstenite::tungstenite::Error as WsError;
        use tokio_tungstenite::tungstenite::error::CapacityError;
        let capacity = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert!(is_too_big(&capacity));
        let wrapped = axum::Error::new(capacity);
        assert!(is_too_big(&wrapped));
        assert!(!is_too_big(&WsError::ConnectionClosed));
    }
}
