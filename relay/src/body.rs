//! Wrappers around streamed bodies, for the few things a relay must know about a body it
//! does not buffer: when it ends, and whether it was touched at all.
//!
//! - [`Guarded`]: holds a value (an exchange's permit) until the body ends or is dropped.
//! - [`watch_end`]: tells when a request body has been sent whole, so that a deadline for
//!   the answer starts then, not while a long upload is still on its way.
//! - [`Handoff`]: a body handed to a hop lazily, so a hop that failed before reading it
//!   (a refused connection) gives it back for another try.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;

/// A body that holds `guard` until it ends (or is dropped).
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
        self.body.is_end_stream()
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
}
