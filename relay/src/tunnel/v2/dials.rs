//! Dials the relay is waiting for: ticket → the stream that asked for it.
//!
//! A v2 stream issues a ticket, sends it to the host on the control channel and waits
//! ([`Dials::expect`]); the host's `GET /v2/dial?ticket=` takes the entry out
//! ([`Dials::take`]: a ticket is good once) and hands its socket over. The table is the
//! relay's, not a tunnel's: a dial must still find its stream after the control channel
//! that carried the ticket was replaced or drained.
//!
//! Bound: an entry lives only as long as the stream waiting on it, which removes it when
//! it gets its socket, gives up (the dial timeout) or is dropped ([`Expected`]'s `Drop`);
//! streams are bounded per tunnel (`max_pending` exchanges, `max_channels` channels).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::host_id::HostId;
use crate::protocol::Frame;
use crate::protocol::v2::Ticket;

/// What a dial socket received.
#[derive(Debug)]
pub enum DialEvent {
    /// A data frame.
    Frame(Frame),
    /// The host's Close, with its code.
    Closed(Option<u16>),
    /// The socket ended or failed without a Close.
    Ended,
}

/// The host's dial-back socket, as the stream that waited for it uses it. Implemented by
/// the relay's WebSocket wrapper ([`crate::client_socket::ClientSocket`]), which charges
/// what it reads to the byte budget like a client's.
#[async_trait]
pub trait DialSocket: Send + 'static {
    /// The next event.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is only taken when it is returned.
    async fn recv(&mut self) -> DialEvent;

    /// Sends a frame, waiting for room.
    ///
    /// # Errors
    /// When the socket is gone or the host stopped reading.
    async fn send(&mut self, frame: Frame) -> Result<(), ()>;

    /// Closes with `code` and `reason` (bounded wait for the host's Close).
    async fn close(self: Box<Self>, code: Option<u16>, reason: &str);

    /// Answers the host's Close (after [`DialEvent::Closed`]) and ends.
    async fn finish(self: Box<Self>);
}

/// A dial socket, boxed.
pub type BoxedDial = Box<dyn DialSocket>;

struct Pending {
    host: HostId,
    socket: oneshot::Sender<BoxedDial>,
}

/// The dials this relay waits for. See the [module docs](self).
#[derive(Default)]
pub struct Dials {
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Dials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dials")
            .field("pending", &self.len())
            .finish()
    }
}

impl Dials {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for `host` to dial back with `ticket`.
    pub fn expect(self: &Arc<Self>, ticket: &Ticket, host: &HostId) -> Expected {
        let (tx, rx) = oneshot::channel();
        let key = ticket.to_string();
        self.pending().insert(
            key.clone(),
            Pending {
                host: host.clone(),
                socket: tx,
            },
        );
        Expected {
            dials: Arc::clone(self),
            key,
            rx,
        }
    }

    /// The stream waiting for `ticket` from `host`, taken out: a ticket is good once, and
    /// only for the host it was sent to. `None`: unknown, expired or used.
    pub fn take(&self, ticket: &str, host: &HostId) -> Option<oneshot::Sender<BoxedDial>> {
        let mut pending = self.pending();
        if pending.get(ticket)?.host != *host {
            return None;
        }
        pending.remove(ticket).map(|p| p.socket)
    }

    /// Forgets `ticket`: its dial message was never sent, so its stream fails now.
    pub(crate) fn forget(&self, ticket: &str) {
        self.pending().remove(ticket);
    }

    /// Dials waited for.
    pub fn len(&self) -> usize {
        self.pending().len()
    }

    /// Whether no dial is waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dial being waited for: resolves to the host's socket, or to `Err` when the ticket
/// was forgotten (never sent). Dropping it withdraws the ticket.
pub struct Expected {
    dials: Arc<Dials>,
    key: String,
    rx: oneshot::Receiver<BoxedDial>,
}

impl Expected {
    /// The ticket, as sent.
    pub fn ticket(&self) -> &str {
        &self.key
    }
}

impl Future for Expected {
    type Output = Result<BoxedDial, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx)
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.dials.forget(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Owner;

    #[test]
    fn a_ticket_is_good_once_and_only_for_its_host() {
        let dials = Arc::new(Dials::default());
        let host = HostId::parse("org:m1").unwrap();
        let other = HostId::parse("org:m2").unwrap();
        let ticket = Ticket::issue(&Owner::new("local", "a").unwrap());
        let expected = dials.expect(&ticket, &host);
        assert!(dials.take(expected.ticket(), &other).is_none());
        assert!(dials.take(expected.ticket(), &host).is_some());
        assert!(dials.take(expected.ticket(), &host).is_none(), "used");
        assert!(dials.is_empty());
    }

    #[test]
    fn a_stream_that_stops_waiting_withdraws_its_ticket() {
        let dials = Arc::new(Dials::default());
        let host = HostId::parse("org:m1").unwrap();
        let ticket = Ticket::issue(&Owner::new("local", "a").unwrap());
        let expected = dials.expect(&ticket, &host);
        let key = expected.ticket().to_owned();
        assert_eq!(dials.len(), 1);
        drop(expected);
        assert!(dials.is_empty());
        assert!(dials.take(&key, &host).is_none());
    }
}
