//! The stream table of one tunnel: every exchange and channel in flight, by id.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use std::sync::atomic::Ordering;

use super::{ChannelSender, Failure, HttpResponse, Queued};
use crate::protocol::{Frame, StreamId, close_code};
use crate::tunnel::ExchangeError;

pub(super) type Responder = oneshot::Sender<Result<HttpResponse, Failure>>;

/// One stream in flight.
#[derive(Debug)]
pub(super) enum Stream {
    /// An HTTP exchange waiting for `http:response`.
    Exchange(Responder),
    /// An open WebSocket channel.
    Channel(ChannelSender),
}

/// What happened to a host frame meant for a channel.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    Delivered,
    /// No channel has that id (never opened, or already closed).
    UnknownId,
    /// The client fell too far behind: the channel was removed and its client told to
    /// close with 1013; the host must be told too.
    Overflowed,
}

/// Bounded by the tunnel's pending-exchange limit plus its open channels; exchanges
/// whose client stopped waiting are pruned (see [`StreamTable::prune_abandoned`]).
#[derive(Debug, Default)]
pub(super) struct StreamTable {
    streams: HashMap<StreamId, Stream>,
}

impl StreamTable {
    pub(super) fn insert(&mut self, id: StreamId, stream: Stream) {
        self.streams.insert(id, stream);
    }

    /// Completes an exchange. Returns false when no exchange has that id.
    pub(super) fn complete(
        &mut self,
        id: StreamId,
        result: Result<HttpResponse, ExchangeError>,
    ) -> bool {
        match self.streams.remove(&id) {
            Some(Stream::Exchange(respond)) => {
                // The client may have just given up; nothing to do then.
                let _ = respond.send(result.map_err(Failure::Failed));
                true
            }
            Some(other) => {
                self.streams.insert(id, other);
                false
            }
            None => false,
        }
    }

    /// Forgets an exchange whose client stopped waiting.
    pub(super) fn abandon(&mut self, id: StreamId) {
        if let Some(Stream::Exchange(_)) = self.streams.get(&id) {
            self.streams.remove(&id);
        }
    }

    /// Whether nothing is in flight: no exchange waits for its answer, no channel is open.
    pub(super) fn is_idle(&self) -> bool {
        self.streams.is_empty()
    }

    /// Whether `id` is an open channel.
    pub(super) fn has_channel(&self, id: StreamId) -> bool {
        matches!(self.streams.get(&id), Some(Stream::Channel(_)))
    }

    /// Hands a host frame to the client of a channel without ever waiting: one slow client
    /// must not stall the other streams of the tunnel.
    pub(super) fn deliver(&mut self, id: StreamId, frame: Frame) -> Delivery {
        let Some(Stream::Channel(channel)) = self.streams.get(&id) else {
            return Delivery::UnknownId;
        };
        // The channel's byte budget first (the receiver only ever lowers the count
        // meanwhile), then the tunnel's and the process's. A frame larger than the whole
        // budget still goes to an empty queue: a client that reads is never closed for
        // one large frame.
        let cost = frame.queued_cost();
        let queued = channel.queued.load(Ordering::Relaxed);
        if queued > 0 && queued + cost > channel.queue_bytes {
            self.close_channel(id, Some(close_code::TRY_AGAIN_LATER));
            return Delivery::Overflowed;
        }
        let Ok(charge) = channel.budget.try_charge(cost) else {
            self.close_channel(id, Some(close_code::TRY_AGAIN_LATER));
            return Delivery::Overflowed;
        };
        match channel.frames.try_send(Queued {
            frame,
            _charge: charge,
        }) {
            Ok(()) => {
                channel.queued.fetch_add(cost, Ordering::Relaxed);
                Delivery::Delivered
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close_channel(id, Some(close_code::TRY_AGAIN_LATER));
                Delivery::Overflowed
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The client task is gone; its own close message is on the way.
                self.streams.remove(&id);
                Delivery::Delivered
            }
        }
    }

    /// Removes a channel and tells its client to close with `code`. Returns false when no
    /// channel has that id.
    pub(super) fn close_channel(&mut self, id: StreamId, code: Option<u16>) -> bool {
        match self.streams.remove(&id) {
            Some(Stream::Channel(channel)) => {
                let _ = channel.closed.send(code);
                true
            }
            Some(other) => {
                self.streams.insert(id, other);
                false
            }
            None => false,
        }
    }

    /// Removes a channel the client closed. Returns false when it was already gone.
    pub(super) fn forget_channel(&mut self, id: StreamId) -> bool {
        if self.has_channel(id) {
            self.streams.remove(&id);
            return true;
        }
        false
    }

    /// Drops exchanges whose client is no longer waiting (timed out or disconnected when
    /// the queue was too full to say so).
    pub(super) fn prune_abandoned(&mut self) -> usize {
        let before = self.streams.len();
        self.streams.retain(|_, stream| match stream {
            Stream::Exchange(respond) => !respond.is_closed(),
            Stream::Channel(channel) => !channel.frames.is_closed(),
        });
        before - self.streams.len()
    }

    /// Ends every stream: exchanges fail at once with `TunnelClosed`, channels are told to
    /// close with `channel_code`.
    /// Returns how many exchanges and channels it cut.
    pub(super) fn fail_all(&mut self, channel_code: u16) -> (usize, usize) {
        let (mut exchanges, mut channels) = (0, 0);
        for (_, stream) in self.streams.drain() {
            match stream {
                Stream::Exchange(respond) => {
                    exchanges += 1;
                    let _ = respond.send(Err(ExchangeError::TunnelClosed.into()));
                }
                Stream::Channel(channel) => {
                    channels += 1;
                    let _ = channel.closed.send(Some(channel_code));
                }
            }
        }
        (exchanges, channels)
    }
}
