//! Wrappers around streamed bodies, for the few things a relay must know about a body it
//! does not buffer: when it ends, and whether it was touched at all.
//!
//! - [`Guarded`]: holds a value (an exchange's permit) until the body ends or is dropped.
//! - [`watch_end`]: tells when a request body has been sent whole, so that a deadline for
//!   the answer starts then, not while a long upload is still on its way.
//! - [`Handoff`]: a body handed to a hop lazily, so a hop that failed before reading it
//!   (a refused connection) gives it back for another try.
//! - [`Indebted`]: a body whose bytes are charged to a [`Debt`] as they are handed to a
//!   sender that buffers them (HTTP/2), until the socket takes them.
//! - [`Paced`]: a client's request body that must keep arriving at a minimum rate, so a
//!   trickling upload cannot hold a connection, a stream or buffered bytes for ever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::budget::Debt;

/// A body that holds `guard` until it ends (or is dropped): until whoever sends it has
/// asked for more after its last chunk.
pub struct Guarded<B, G> {
    body: B,
    guard: Option<G>,
}

impl<B, G> Guarded<B, G> {
    /// `body`, holding `guard` for as long as it streams.
    pub fn new(body: B, guard: G) -> Guarded<B, G> {
        Guarded {
            body,
            guard: Some(guard),
        }
    }
}

impl<B, G> http_body::Body for Guarded<B, G>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Not while the guard is held: a server that sees the end would drop the body
        // (and the guard) as soon as it has the last chunk in its buffer, not once the
        // chunk is written; it polls once more instead, when its buffer has room.
        self.guard.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A body whose data is charged to a [`Debt`] before it is handed over: waiting for room
/// when there is none, which slows its producer (a client's upload) down to the pace of
/// the socket it goes to instead of buffering ahead of it. Room for a first part of each
/// chunk ([`crate::limits::DEBT_PREPAID`]) is charged before the chunk is even read, so
/// that while the budget is full nothing more is read from the producer at all.
pub struct Indebted<B> {
    body: B,
    debt: Arc<Debt>,
    state: Payment,
}

enum Payment {
    /// Nothing charged for the next chunk yet.
    Due,
    /// Charging the first part of the next chunk, before reading it.
    Prepaying(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// The first part is charged: the chunk can be read.
    Prepaid,
    /// Charging the rest of a chunk read, before handing it over.
    Settling(Frame<Bytes>, Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl<B> Indebted<B> {
    /// `body`, its data charged to `debt`.
    pub fn new(body: B, debt: Arc<Debt>) -> Indebted<B> {
        Indebted {
            body,
            debt,
            state: Payment::Due,
        }
    }

    fn charge(&self, bytes: usize) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let debt = self.debt.clone();
        Box::pin(async move { debt.incur(bytes).await })
    }
}

impl<B> http_body::Body for Indebted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            match &mut self.state {
                Payment::Due => {
                    let prepaying = self.charge(crate::limits::DEBT_PREPAID);
                    self.state = Payment::Prepaying(prepaying);
                }
                Payment::Prepaying(payment) => {
                    std::task::ready!(payment.as_mut().poll(cx));
                    self.state = Payment::Prepaid;
                }
                Payment::Prepaid => {
                    let frame = match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                        Some(Ok(frame)) => frame,
                        // The end (what was prepaid is paid off by the next bytes the
                        // tunnel writes), or the client's error.
                        other => return Poll::Ready(other),
                    };
                    let rest = frame
                        .data_ref()
                        .map_or(0, Bytes::len)
                        .saturating_sub(crate::limits::DEBT_PREPAID);
                    if rest == 0 {
                        self.state = Payment::Due;
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let settling = self.charge(rest);
                    self.state = Payment::Settling(frame, settling);
                }
                Payment::Settling(_, payment) => {
                    std::task::ready!(payment.as_mut().poll(cx));
                    let Payment::Settling(frame, _) =
                        std::mem::replace(&mut self.state, Payment::Due)
                    else {
                        unreachable!("matched above")
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !matches!(self.state, Payment::Settling(..)) && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `body`, and a receiver that resolves once it has ended (yielded its end, failed, or
/// been dropped by whoever sends it).
pub fn watch_end(body: Body) -> (Body, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    if http_body::Body::is_end_stream(&body) {
        let _ = tx.send(());
        return (body, rx);
    }
    (Body::new(Guarded::new(body, EndSignal(Some(tx)))), rx)
}

/// Fires its sender when dropped.
struct EndSignal(Option<oneshot::Sender<()>>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A body given to a hop that takes it out of a shared slot only when first polled. If
/// the hop fails before that (a refused connection sends nothing), [`Handoff::reclaim`]
/// gets the untouched body back for another try.
pub struct Handoff {
    slot: Arc<Mutex<Option<Body>>>,
    taken: Option<Body>,
    end_stream: bool,
    size_hint: SizeHint,
}

impl Handoff {
    /// A hop's view of `body`, and the slot to reclaim it from.
    pub fn new(body: Body) -> (Handoff, Arc<Mutex<Option<Body>>>) {
        let end_stream = http_body::Body::is_end_stream(&body);
        let size_hint = http_body::Body::size_hint(&body);
        let slot = Arc::new(Mutex::new(Some(body)));
        let handoff = Handoff {
            slot: slot.clone(),
            taken: None,
            end_stream,
            size_hint,
        };
        (handoff, slot)
    }

    /// The body back, if no hop has started reading it.
    pub fn reclaim(slot: &Mutex<Option<Body>>) -> Option<Body> {
        slot.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl http_body::Body for Handoff {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.taken.is_none() {
            // Held for one `take`; never across an await.
            let body = self
                .slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            match body {
                Some(body) => self.taken = Some(body),
                // Reclaimed for another hop: this one gets nothing more.
                None => return Poll::Ready(None),
            }
        }
        match &mut self.taken {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(body) => http_body::Body::is_end_stream(body),
            None => self.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(body) => http_body::Body::size_hint(body),
            None => self.size_hint,
        }
    }
}

/// A client's request body that fails ([`UploadTooSlow`]) once the time spent waiting
/// for it passes `grace` plus one second for every `rate` bytes received: a client
/// uploading at `rate` or faster is never cut, one that trickles a byte every few
/// seconds is cut after about `grace`. Only the time the body is asked for and has
/// nothing counts: while the host's side is not reading (flow control), the client is
/// not to blame. A `rate` of 0 turns the check off.
pub struct Paced<B> {
    body: B,
    grace: Duration,
    rate: u64,
    received: u64,
    /// Time spent waiting for the client so far, and since when it is waited for now.
    waited: Duration,
    waiting_since: Option<Instant>,
    /// Wakes the reader at the deadline of the wait in progress.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The error of a [`Paced`] body whose client sent too slowly.
#[derive(Debug, thiserror::Error)]
#[error("the client sent its request body too slowly")]
pub struct UploadTooSlow;

/// Whether `err`, or an error it wraps, is [`UploadTooSlow`].
pub fn is_upload_too_slow(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<UploadTooSlow>() {
            return true;
        }
        current = err.source();
    }
    false
}

impl<B> Paced<B> {
    /// `body`, which must arrive at `rate` bytes a second after `grace`.
    pub fn new(body: B, grace: Duration, rate: u64) -> Paced<B> {
        Paced {
            body,
            grace,
            rate,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        }
    }

    /// How long the client may have been waited for, given what it sent.
    fn allowed(&self) -> Duration {
        self.grace + Duration::from_secs_f64(self.received as f64 / self.rate as f64)
    }
}

impl<B> http_body::Body for Paced<B>
where
    B: http_body::Body<Data = Bytes, Error = axum::Error> + Unpin,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if self.rate == 0 {
            return polled;
        }
        let now = Instant::now();
        if let Some(since) = self.waiting_since.take() {
            self.waited += now - since;
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                let allowed = self.allowed();
                let Some(left) = allowed.checked_sub(self.waited).filter(|d| !d.is_zero()) else {
                    return Poll::Ready(Some(Err(axum::Error::new(UploadTooSlow))));
                };
                self.waiting_since = Some(now);
                let deadline = now + left;
                let timer = match &mut self.timer {
                    Some(timer) => {
                        timer.as_mut().reset(deadline);
                        timer
                    }
                    None => self
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(axum::Error::new(UploadTooSlow))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_guard_is_released_when_the_body_ends() {
        let guard = Arc::new(());
        let body = Guarded::new(Body::from("abc"), guard.clone());
        assert_eq!(Arc::strong_count(&guard), 2);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "abc");
        assert_eq!(Arc::strong_count(&guard), 1);
    }

    #[tokio::test]
    async fn the_end_of_a_body_is_signalled_once_it_is_read() {
        let (body, mut ended) = watch_end(Body::from("abc"));
        assert!(ended.try_recv().is_err(), "not read yet");
        let _ = body.collect().await.unwrap();
        ended.await.expect("signalled");
        let (_body, ended) = watch_end(Body::empty());
        ended.await.expect("an empty body has ended already");
    }

    #[tokio::test]
    async fn an_untouched_handoff_gives_the_body_back() {
        let (handoff, slot) = Handoff::new(Body::from("payload"));
        assert_eq!(http_body::Body::size_hint(&handoff).exact(), Some(7));
        drop(handoff);
        let body = Handoff::reclaim(&slot).expect("never read");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "payload");

        let (handoff, slot) = Handoff::new(Body::from("payload"));
        assert_eq!(handoff.collect().await.unwrap().to_bytes(), "payload");
        assert!(Handoff::reclaim(&slot).is_none(), "read by the hop");
    }

    /// A body that sends `chunks`, each after `gap`.
    fn trickle(chunks: usize, size: usize, gap: Duration) -> Body {
        let stream = futures_util::stream::iter(0..chunks).then(move |_| async move {
            tokio::time::sleep(gap).await;
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))
        });
        Body::from_stream(stream)
    }

    use futures_util::StreamExt as _;

    #[tokio::test]
    async fn a_trickling_upload_is_cut_after_the_grace() {
        let body = Paced::new(
            trickle(100, 1, Duration::from_millis(40)),
            Duration::from_millis(200),
            1024,
        );
        let started = Instant::now();
        let Err(err) = body.collect().await else {
            panic!("a trickling upload was read whole");
        };
        assert!(is_upload_too_slow(&err), "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn an_upload_at_the_minimum_rate_is_never_cut() {
        // 20 chunks of 100 bytes, 50 ms apart: 2,000 bytes a second against a minimum of
        // 1,000, for a second, five times the grace.
        let body = Paced::new(
            trickle(20, 100, Duration::from_millis(50)),
            Duration::from_millis(200),
            1000,
        );
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 2_000);
    }
}
